"""The ``"native"`` backend: the compiled extension ``dancegrpo._C`` (csrc/).

Importing ``dancegrpo._C`` registers the ``torch.ops.dancegrpo.*`` ops (schemas in
compiled.py) with CPU kernels, Meta kernels for tracing, and CUDA kernels when the
extension was built with CUDA. Nothing here runs at ``import dancegrpo`` time.

What the extension reports about itself is read once, at load, into plain Python values:
``devices`` is consulted on every dispatch, including inside ``torch.compile`` regions, where
calling into the pybind module would break the graph.
"""

from __future__ import annotations

import importlib

from .compiled import CompiledBackend, register_autograd


class NativeBackend(CompiledBackend):
    name = "native"
    namespace = "dancegrpo"

    def __init__(self):
        self._module = None
        self._error: str | None = None
        self._devices: tuple[str, ...] = ()

    def _load(self):
        if self._module is None and self._error is None:
            try:
                module = importlib.import_module("dancegrpo._C")
            except ImportError as exc:  # not built (DANCEGRPO_SKIP_EXT=1) or built for another torch
                self._error = (f"dancegrpo._C is not importable ({exc}); build it with "
                               "`pip install --no-build-isolation -e .`")
            else:
                register_autograd(self.namespace)
                self._devices = ("cpu", "cuda") if module.cuda_built() else ("cpu",)
                self._module = module
        return self._module

    @property
    def devices(self) -> tuple[str, ...]:
        self._load()
        return self._devices

    def unavailable_reasons(self) -> list[str]:
        self._load()
        return [self._error] if self._error else []

    def build_info(self) -> str:
        module = self._load()
        if module is None:
            return "not built"
        cuda = "CPU + CUDA" if module.cuda_built() else "CPU only (built without CUDA)"
        return f"{cuda}, OpenMP threads {module.omp_max_threads()}"


BACKEND = NativeBackend()
