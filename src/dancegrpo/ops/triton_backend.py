"""The ``"triton"`` backend: fused Triton kernels from ``dancegrpo.kernels``.

Ops live in ``torch.ops.dancegrpo_triton`` (schemas in compiled.py). They are registered on
first use of the backend (importing ``dancegrpo.kernels.custom_ops`` imports Triton and defines
the kernels; nothing compiles until a kernel is launched), never at ``import dancegrpo``.

Devices: CUDA; and CPU too when Triton runs in interpreter mode (``TRITON_INTERPRET=1``, set
before the kernels are first loaded), which is how the tests run the kernels without a GPU.
Interpreted kernels are slow, so ``"auto"`` never picks this backend on CPU (dispatch.PRIORITY).

``sample_step`` with ``noise=None`` draws the noise inside the kernel (Philox) from a 64-bit
seed that it draws from the caller's generator (one ``torch.randint``, no host sync), so a
rollout is reproducible from the generator's seed; the stream differs from ``torch.randn``'s.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from .compiled import CompiledBackend, register_autograd

_MIN_TRITON = (3, 0)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A 1-element int64 tensor on ``device`` drawn from ``generator`` (the device's default
    generator when None). Drawn on the generator's own device and copied without blocking."""
    gen_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


class TritonBackend(CompiledBackend):
    name = "triton"
    namespace = "dancegrpo_triton"

    def __init__(self):
        self._module = None  # dancegrpo.kernels.custom_ops once loaded
        self._error: str | None = None

    def _load(self):
        if self._module is not None or self._error is not None:
            return self._module
        if importlib.util.find_spec("triton") is None:
            self._error = "triton is not installed (pip install 'triton>=3.0'; it ships with CUDA builds of torch)"
            return None
        try:
            import triton
        except ImportError as exc:  # installed but broken (e.g. built for another Python)
            self._error = f"triton is not importable ({exc})"
            return None
        version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
        if version < _MIN_TRITON:
            self._error = f"triton {triton.__version__} is too old (need >= {'.'.join(map(str, _MIN_TRITON))})"
            return None
        if not hasattr(torch.library, "custom_op"):
            self._error = f"torch {torch.__version__} lacks torch.library.custom_op (need torch >= 2.4)"
            return None
        self._module = importlib.import_module("dancegrpo.kernels.custom_ops")
        register_autograd(self.namespace)
        return self._module

    def _ops(self):
        if self._load() is None:
            raise RuntimeError(f"the triton backend is unavailable: {self._error}")
        return super()._ops()

    @property
    def interpreted(self) -> bool:
        """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at load time)."""
        if self._load() is None:
            return False
        from dancegrpo.kernels import _config

        return _config.INTERPRET

    @property
    def devices(self) -> tuple[str, ...]:
        return ("cuda", "cpu") if self.interpreted else ("cuda",)

    def unavailable_reasons(self) -> list[str]:
        self._load()
        return [self._error] if self._error else []

    def sample_step(self, v, x, noise, generator, a, b, std, reduction):
        if noise is not None:
            return super().sample_step(v, x, noise, generator, a, b, std, reduction)
        seed = draw_seed(generator, x.device)
        return self._ops().sample_step_rng(v, x, seed, a, b, std, reduction == "sum")


BACKEND = TritonBackend()
