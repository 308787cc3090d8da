"""Argument checks shared by the public functions: errors name the argument and what was expected.

Metadata checks (shape, dtype, device) never read values, so they never sync a GPU or break a
``torch.compile`` graph. The few value checks go through ``all_true``: on the host when that is
free or when the caller asked for it, as an assert in the graph (or on the device) otherwise.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(op: str, name: str, t, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a float tensor (fp32/bf16/fp16/fp64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def latents(op: str, **named) -> tuple[int, torch.device]:
    """Big per-sample tensors: same shape (B, ...), B >= 1, non-empty samples, one device."""
    items = [(k, v) for k, v in named.items() if v is not None]
    first_name, first = items[0]
    for name, t in items:
        tensor(op, name, t)
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} must have a batch dimension (B, ...), got a scalar")
    if first.shape[0] == 0:
        raise ValueError(f"{op}: {first_name} has an empty batch (B = 0)")
    if first.numel() == 0:
        raise ValueError(f"{op}: {first_name} has empty samples (shape {tuple(first.shape)})")
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {first_name} has "
                             f"{tuple(first.shape)}; expected the same shape")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
    return first.shape[0], first.device


def per_sample(op: str, batch: int, device: torch.device, **named) -> None:
    """Per-sample vectors: shape (B,), on ``device``."""
    for name, t in named.items():
        if t is None:
            continue
        tensor(op, name, t)
        if t.shape != (batch,):
            raise ValueError(f"{op}: {name} must have shape ({batch},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")


def choice(op: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {tuple(allowed)}, got {value!r}")


def nonneg_float(op: str, name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not (value == value) or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{op}: {name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return value


def all_true(ok: torch.Tensor, message: str, *, got=None, sync: bool = False) -> None:
    """Raise ``ValueError(message + got())`` unless every element of the bool tensor ``ok`` is true.

    On the CPU (or anywhere with ``sync=True``) the value is read on the host and the error
    names the offending values (``got``: a callable, run only on failure). On an accelerator,
    and inside ``torch.compile`` where reading a value would break the graph, it queues
    ``torch._assert_async(ok, message)`` instead: no sync and no graph break; that raises a
    RuntimeError with the message on the CPU and is a device-side assert on a GPU.
    """
    if not torch.compiler.is_compiling() and (sync or ok.device.type == "cpu"):
        if not bool(ok.all()):
            raise ValueError(message + (got() if got is not None else ""))
    else:
        torch._assert_async(ok.all(), message)
