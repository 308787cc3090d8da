"""Which steps are sampled with noise, and which of those are trained (step 3 of the loop in loop.py).

* ``dance`` (DanceGRPO): the whole trajectory is stochastic; the last step is dropped and
  each sample trains a random subset of a fraction ``tau`` of the remaining steps.
* ``all`` (Flow-GRPO): every stochastic step but the last is trained.
* ``window`` (MixGRPO): only a sliding window of ``window_size`` steps is stochastic (ODE steps
  elsewhere, so the rest of the trajectory costs no log-prob) and all of it is trained; the
  window moves by ``window_stride`` every ``window_shift_every`` iterations and wraps around.
* ``random_window`` (Flow-GRPO-Fast): like ``window``, but each iteration's window of
  ``window_size`` steps starts at a uniformly random step of ``window_range`` [lo, hi) (so it
  lies in [lo, hi + window_size - 1)); the draw depends only on ``(seed, iteration)``.

Steps whose coefficient std is 0 (e.g. CPS's last step) are never stochastic: they have no
log-probability.
"""

from __future__ import annotations

import torch

__all__ = ["TimestepSelector"]

_STRATEGIES = ("dance", "all", "window", "random_window")


class TimestepSelector:
    """stochastic: (N,) bool, the sampler's steps with std > 0."""

    def __init__(self, strategy: str, stochastic: torch.Tensor, *, fraction: float = 0.6, window_size: int = 4,
                 window_stride: int = 1, window_shift_every: int = 25, window_range=None, seed: int = 0):
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.strategy = strategy
        self.stochastic = stochastic.detach().cpu().bool()
        self.num_steps = self.stochastic.numel()
        self.fraction = float(fraction)
        self.window_size, self.window_stride = int(window_size), int(window_stride)
        self.window_shift_every = int(window_shift_every)
        if strategy in ("window", "random_window") and not 1 <= self.window_size < self.num_steps:
            raise ValueError(f"window_size must lie in [1, {self.num_steps}), got {window_size}")
        lo, hi = (0, max(1, min(self.num_steps // 2, self.num_steps - self.window_size))) if not window_range else (int(window_range[0]), int(window_range[1]))
        if strategy == "random_window" and not 0 <= lo < hi <= self.num_steps - self.window_size:
            raise ValueError(f"window_range must be [lo, hi) with 0 <= lo < hi <= num_steps - window_size = "
                             f"{self.num_steps - self.window_size}, got {[lo, hi]}")
        self.window_range, self.seed = (lo, hi), int(seed)
        trainable = self.sde_mask(0).clone()
        trainable[-1] = False
        if not bool(trainable.any()):
            raise ValueError("no trainable step: the sampler has no stochastic step before the last one "
                             "(eta = 0, or a window that only covers the last step)")

    def window_start(self, iteration: int) -> int:
        if self.strategy == "random_window":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
            lo, hi = self.window_range
            return int(torch.randint(lo, hi, (1,), generator=gen))
        positions = self.num_steps - 1 - self.window_size + 1  # windows that exclude the last step
        positions = max(positions, 1)
        return (iteration // self.window_shift_every * self.window_stride) % positions

    def sde_mask(self, iteration: int) -> torch.Tensor:
        """(N,) bool: the steps of this iteration's rollout that are sampled with noise."""
        if self.strategy not in ("window", "random_window"):
            return self.stochastic.clone()
        mask = torch.zeros(self.num_steps, dtype=torch.bool)
        start = self.window_start(iteration)
        mask[start:start + self.window_size] = True
        return mask & self.stochastic

    def num_train_steps(self, sde_mask: torch.Tensor) -> int:
        candidates = int(sde_mask[:-1].sum())
        if self.strategy == "dance":
            return max(1, int(self.fraction * candidates))
        return candidates

    def choose(self, sde_mask: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, K) long: the steps each sample trains, ascending (last step never included).

        ``generator`` is a CPU generator (the choice is part of the run's reproducible state).
        """
        candidates = sde_mask[:-1].nonzero().flatten()
        if candidates.numel() == 0:
            raise ValueError("no trainable step in this rollout (every stochastic step is the last one)")
        k = self.num_train_steps(sde_mask)
        if self.strategy != "dance":
            return candidates.expand(batch, -1).clone()
        order = torch.rand((batch, candidates.numel()), generator=generator).argsort(1)[:, :k]
        return candidates[order.sort(1).values]
