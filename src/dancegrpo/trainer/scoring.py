"""Scoring rollouts with one or several reward models, robust to a reward that fails.

A reward that raises on a batch is retried sample by sample; a sample it still fails on (or
scores non-finite) gets NaN, which ``group_advantages(..., nan_policy="drop")`` turns into a
dropped sample (advantage 0, left out of its group's statistics). The run goes on and the
failure is logged; the paper's code scores such a sample -1, which biases its group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["WeightedReward", "ScoreResult", "score_samples", "build_rewards"]

log = logging.getLogger("dancegrpo.trainer")


@dataclass
class WeightedReward:
    fn: object
    weight: float
    name: str


@dataclass
class ScoreResult:
    rewards: torch.Tensor                 # (B, K) fp32 on CPU, NaN where a reward failed
    errors: list[str] = field(default_factory=list)

    @property
    def valid(self) -> torch.Tensor:
        return torch.isfinite(self.rewards).all(1)


def build_rewards(specs) -> list[WeightedReward]:
    """Rewards from config entries (``name``, ``weight``, ``kwargs``), via the registry."""
    from ..registry import build_reward

    out, seen = [], set()
    for spec in specs:
        fn = build_reward(spec.name, **spec.kwargs)
        name = spec.name
        if name in seen:  # two entries of one reward with different kwargs stay distinguishable
            name = f"{name}_{len(seen)}"
        seen.add(name)
        out.append(WeightedReward(fn, float(spec.weight), name))
    return out


def _as_scores(value, batch: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().float().cpu().reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"reward {name!r} returned {t.numel()} scores for {batch} samples; expected shape ({batch},)")
    return t


def _one(reward: WeightedReward, samples: torch.Tensor, prompts: Sequence[str], errors: list[str]) -> torch.Tensor:
    batch = samples.shape[0]
    try:
        return _as_scores(reward.fn(samples, list(prompts)), batch, reward.name)
    except Exception as exc:  # noqa: BLE001 - any reward failure is isolated per sample below
        batch_error = f"{type(exc).__name__}: {exc}"
    # The batch call failed: find the samples that fail on their own, score the rest.
    out = torch.full((batch,), float("nan"))
    failed = []
    for i in range(batch):
        try:
            out[i] = _as_scores(reward.fn(samples[i:i + 1], [prompts[i]]), 1, reward.name)[0]
        except Exception as exc:  # noqa: BLE001
            failed.append(i)
            last = f"{type(exc).__name__}: {exc}"
    if failed:
        msg = (f"reward {reward.name!r} failed on {len(failed)}/{batch} samples (dropped: {failed[:8]}); "
               f"last error: {last}")
    else:
        msg = f"reward {reward.name!r} failed on the batch but on no single sample: {batch_error}"
    errors.append(msg)
    log.warning(msg)
    return out


def score_samples(rewards: Sequence[WeightedReward], samples: torch.Tensor, prompts: Sequence[str]) -> ScoreResult:
    """Score decoded samples (B, 3, [T,] H, W) with every reward: (B, K) fp32, NaN = dropped."""
    errors: list[str] = []
    cols = [_one(r, samples, prompts, errors) for r in rewards]
    scores = torch.stack(cols, 1)
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        for k in bad.any(0).nonzero().flatten().tolist():
            if not any(rewards[k].name in e for e in errors):
                msg = f"reward {rewards[k].name!r} gave non-finite scores for {int(bad[:, k].sum())} samples (dropped)"
                errors.append(msg)
                log.warning(msg)
    return ScoreResult(scores, errors)
