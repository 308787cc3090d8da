"""Argument checks shared by the public functions: errors name the argument and what was expected.

Only metadata is inspected here (shape, dtype, device), never values, so no check syncs a GPU
or breaks a ``torch.compile`` graph; value checks on the coefficients happen once, eagerly,
when ``StepCoeffs`` is built.
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
