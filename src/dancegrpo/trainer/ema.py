"""Exponential moving average of the trained parameters (DanceGRPO: decay 0.995)."""

from __future__ import annotations

import torch

__all__ = ["EMA"]


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.

    Tracks only the parameters that train (the LoRA adapters under LoRA), in fp32.
    """

    def __init__(self, named_params, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        extra = set(state) - set(self.shadow)
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @torch.no_grad()
    def copy_to(self, named_params) -> None:
        """Write the averaged weights into ``named_params`` (e.g. to evaluate the EMA model)."""
        for n, p in named_params:
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))
