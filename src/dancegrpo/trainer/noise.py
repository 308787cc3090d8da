"""Rollout noise drawn per sample from (run seed, iteration, global sample index, sampler step).

A sample's noise does not depend on which process makes it nor on how many samples that
process makes at once, so a run split over N processes reproduces the one-process rollouts
exactly. Each draw seeds its own generator from a hash of the tuple (numpy's SeedSequence),
which also makes resuming trivial: the iteration number is the only state.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SampleNoise", "iteration_seed"]

_INITIAL = 2**31 - 1  # the "step" slot of the initial-noise draw (no sampler has that many steps)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def iteration_seed(seed: int, step: int, stream: int) -> int:
    """A seed for one iteration's draws of one kind (``stream``) that no sample draw shares."""
    return _seed(seed, step, stream, 0, 0)  # SampleNoise draws streams 0 and 1


class SampleNoise:
    """Noise for the samples ``sample_ids`` (global indices, (b,) long) of iteration ``step``.

    ``group_ids`` (b,): the prompt of each sample; with ``share_noise`` a group starts from the
    prompt's initial noise (the step noise stays per sample).
    """

    def __init__(self, seed: int, step: int, sample_ids: torch.Tensor, group_ids: torch.Tensor, share_noise: bool):
        self.seed, self.step = int(seed), int(step)
        self.sample_ids = [int(i) for i in sample_ids.tolist()]
        self.group_ids = [int(i) for i in group_ids.tolist()]
        self.share_noise = bool(share_noise)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _draw(self, keys: list[int], stream: int, slot: int, shape, device) -> torch.Tensor:
        device = torch.device(device)
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device)
        out = torch.empty((len(keys), *shape), device=device)
        for row, key in enumerate(keys):
            g.manual_seed(_seed(self.seed, self.step, stream, key, slot))
            out[row] = torch.randn(tuple(shape), generator=g, device=device)
        return out

    def initial(self, shape, device) -> torch.Tensor:
        """(b, *shape) starting noise x_0."""
        if self.share_noise:
            return self._draw(self.group_ids, 1, _INITIAL, shape, device)
        return self._draw(self.sample_ids, 0, _INITIAL, shape, device)

    def step_noise(self, i: int, shape, device) -> torch.Tensor:
        """(b, *shape) noise of sampler step ``i``."""
        return self._draw(self.sample_ids, 0, i, shape, device)
