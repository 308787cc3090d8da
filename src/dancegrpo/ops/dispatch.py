"""Backend registry and selection (the xformers model).

A backend declares what it supports and answers ``not_supported_reasons(op, tensors)``.
``"auto"`` walks ``PRIORITY[device type]`` (data, not code) and takes the first backend with
no reasons; if none fits it raises with every backend's reasons. An explicitly requested
backend that cannot run raises. ``DANCEGRPO_BACKEND`` replaces ``"auto"`` by a name.

Backends are imported lazily: choosing one is the first time its extension or Triton loads,
also when that first time is inside a ``torch.compile`` trace (see trace_load.py), so no op
needs an eager call before compiling.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence

import torch

# grpo_step_loss composes step_logprob (with v_ref) and clipped_ratio_loss of one backend.
OPS = ("step_logprob", "sample_step", "group_advantages", "clipped_ratio_loss", "grpo_step_loss", "nft_loss")

# name -> "module:attribute" of the Backend instance; imported on first use.
_BACKEND_PATHS = {
    "torch": "dancegrpo.ops.torch_backend:BACKEND",
    "native": "dancegrpo.ops.native_backend:BACKEND",
    "triton": "dancegrpo.ops.triton_backend:BACKEND",
}

# What "auto" tries, per device type, fastest first. On CUDA the order comes from
# bench/ measurements (see README); on CPU Triton only runs interpreted, so auto never picks it.
PRIORITY = {
    "cpu": ("native", "torch"),
    "cuda": ("native", "triton", "torch"),
}
_DEFAULT_PRIORITY = ("torch",)

_loaded: dict[str, Backend] = {}


class Backend:
    """What every backend declares. Subclasses implement the raw ops named in ``OPS``.

    Raw-op contract (all per-sample scalars are fp32 (B,) tensors on the data's device; big
    tensors have shape (B, ...), any strides, any of fp32/bf16/fp16):

    * ``step_logprob(v, x, y, v_ref, a, b, std, reduction) -> (logp, msd)``: differentiable in
      v, x, y. logp (B,) fp32; msd = mean((v - v_ref)^2) (B,) fp32, or None without v_ref.
    * ``sample_step(v, x, noise, generator, a, b, std, reduction) -> (y, logp)``: no grad;
      noise None means draw N(0, 1) from ``generator``. y in x.dtype; logp of the stored y.
    * ``group_advantages(rewards (B,K), weights (K,), group_size, std, unbiased, eps, clip,
      aggregate, drop_nonfinite) -> (B,) fp32``.
    * ``clipped_ratio_loss(logp, old_logp, adv, ref_logp, clip_low, clip_high, beta,
      reduction) -> (loss, stats (3,))``: differentiable in logp.
    * ``nft_loss(v, v_old, target, r, t, beta, eps, adaptive) -> (per (B,), parts (B, 5))``:
      DiffusionNFT's per-sample loss (``reference.nft_loss_ref``), differentiable in v only.
    """

    name: str = "?"
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    ops: tuple[str, ...] = OPS

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all here (missing extension, missing Triton...)."""
        return []

    def not_supported_reasons(self, op: str, tensors: Sequence[torch.Tensor | None]) -> list[str]:
        reasons = list(self.unavailable_reasons())
        if op not in self.ops:
            reasons.append(f"op {op!r} not implemented")
        for t in tensors:
            if t is None:
                continue
            if t.device.type not in self.devices:
                reasons.append(f"device {t.device.type!r} not in {self.devices}")
                break
        for t in tensors:
            if t is not None and t.is_floating_point() and t.dtype not in self.dtypes:
                reasons.append(f"dtype {t.dtype} not in {[str(d) for d in self.dtypes]}")
                break
        return reasons


def get_backend(name: str) -> Backend:
    if name not in _BACKEND_PATHS:
        raise ValueError(f"backend must be one of {['auto', *_BACKEND_PATHS]}, got {name!r}")
    if name not in _loaded:
        module, attr = _BACKEND_PATHS[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), attr)
    return _loaded[name]


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKEND_PATHS)


def select_backend(op: str, backend: str, tensors: Sequence[torch.Tensor | None]) -> Backend:
    """The backend that runs ``op`` on ``tensors``: explicit (raises if it cannot) or auto."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if torch.compiler.is_compiling():
        from .trace_load import load_backends  # the import itself runs for real under dynamo

        load_backends()
    if backend == "auto":
        backend = os.environ.get("DANCEGRPO_BACKEND", "auto") or "auto"
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.not_supported_reasons(op, tensors)
        if reasons:
            raise RuntimeError(f"backend {backend!r} cannot run {op}: " + "; ".join(reasons))
        return chosen
    device = next((t.device.type for t in tensors if t is not None), "cpu")
    tried = []
    for name in PRIORITY.get(device, _DEFAULT_PRIORITY):
        candidate = get_backend(name)
        reasons = candidate.not_supported_reasons(op, tensors)
        if not reasons:
            return candidate
        tried.append(f"{name}: " + "; ".join(reasons))
    raise RuntimeError(f"no backend can run {op} on these inputs:\n  " + "\n  ".join(tried))


def availability(device: str = "cpu") -> dict[str, list[str]]:
    """Backend name -> reasons it is unavailable (empty list: available). Never raises."""
    out = {}
    for name in _BACKEND_PATHS:
        try:
            b = get_backend(name)
            reasons = list(b.unavailable_reasons())
            if device not in b.devices:
                reasons.append(f"device {device!r} not in {b.devices}")
        except ImportError as exc:  # a backend module that cannot even import says why
            reasons = [f"import failed: {exc}"]
        out[name] = reasons
    return out
