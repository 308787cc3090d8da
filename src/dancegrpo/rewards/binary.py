"""``binary``: any registered reward turned into 0/1 by a threshold (DanceGRPO's binary reward)."""

from __future__ import annotations

import math

import torch

__all__ = ["BinaryReward"]


class BinaryReward:
    """``1.0`` where the inner reward scores ``>= threshold``, else ``0.0``; NaN stays NaN (a
    failed sample is still dropped, not counted as a miss).

    ``reward`` is a registry name, built with ``kwargs``; the name reads ``binary(<inner>)``.
    """

    def __init__(self, reward: str, threshold: float, kwargs: dict | None = None):
        from ..trainer.policy import build_named

        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not math.isfinite(threshold):
            raise ValueError(f"binary: threshold must be a finite number, got {threshold!r}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"binary: kwargs must be a mapping of the inner reward's arguments, got {kwargs!r}")
        self.inner = build_named("reward", reward, "binary.reward", **(kwargs or {}))
        self.threshold = float(threshold)
        inner_name = getattr(self.inner, "name", None) or reward
        self.name = f"binary({inner_name})"
        self.range = (0.0, 1.0)

    def __call__(self, samples: torch.Tensor, prompts) -> torch.Tensor:
        s = torch.as_tensor(self.inner(samples, prompts)).float()
        hit = (s >= self.threshold).float()
        return torch.where(torch.isnan(s), s, hit)

    def __repr__(self) -> str:
        return f"BinaryReward(name={self.name!r}, threshold={self.threshold})"
