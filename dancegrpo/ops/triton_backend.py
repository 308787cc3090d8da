"""The ``"triton"`` backend: fused Triton kernels from ``dancegrpo.kernels``.

(Placeholder until the Triton kernels land: reports itself unavailable.)
"""

from __future__ import annotations

from .compiled import CompiledBackend


class TritonBackend(CompiledBackend):
    name = "triton"
    namespace = "dancegrpo_triton"
    devices = ("cuda",)

    def unavailable_reasons(self) -> list[str]:
        return ["Triton kernels not implemented yet"]


BACKEND = TritonBackend()
