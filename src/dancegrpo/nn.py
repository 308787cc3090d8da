"""``nn.Module`` wrappers: the drop-in losses."""

from __future__ import annotations

import torch

from .functional import grpo_step_loss

__all__ = ["GRPOStepLoss"]


class GRPOStepLoss(torch.nn.Module):
    """Module form of :func:`dancegrpo.grpo_step_loss` (clip ranges, beta, backend fixed at init).

    ``forward(model_output, latents, next_latents, coeffs, old_logp, advantages,
    ref_model_output=None) -> (loss, stats)``.
    """

    def __init__(self, clip_range: float = 1e-4, clip_range_high: float | None = None, beta: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.clip_range, self.clip_range_high, self.beta, self.backend = clip_range, clip_range_high, beta, backend

    def forward(self, model_output, latents, next_latents, coeffs, old_logp, advantages, ref_model_output=None):
        return grpo_step_loss(model_output, latents, next_latents, coeffs, old_logp, advantages,
                              clip_range=self.clip_range, clip_range_high=self.clip_range_high,
                              ref_model_output=ref_model_output, beta=self.beta, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"clip_range={self.clip_range}, clip_range_high={self.clip_range_high}, beta={self.beta}, "
                f"backend={self.backend!r}")
