"""Scoring rollouts with one or several reward models, robust to a reward that fails.

A reward that raises on a batch is retried sample by sample (unless its exception has a true
``whole_batch`` attribute: then the whole batch fails); a sample it still fails on (or
scores non-finite) gets NaN, which ``group_advantages(..., nan_policy="drop")`` turns into a
dropped sample (advantage 0, left out of its group's statistics). The run goes on and the
failure is logged; the paper's code scores such a sample -1, which biases its group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

__all__ = ["WeightedReward", "ScoreResult", "score_samples", "build_rewards", "as_weighted_rewards", "reward_label",
           "AsyncScorer"]

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
    failures: dict[str, str] = field(default_factory=dict)  # reward name -> its last error, when it failed

    @property
    def valid(self) -> torch.Tensor:
        return torch.isfinite(self.rewards).all(1)


def reward_label(fn) -> str:
    """What metrics call a reward object: its ``name``, else its function or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(fn, "__name__", None) or type(fn).__name__


def _unique(names: list[str]) -> list[str]:
    """Two entries of one reward (e.g. different kwargs) stay distinguishable: name, name_1, ..."""
    out, seen = [], set()
    for name in names:
        label, k = name, 0
        while label in seen:
            k += 1
            label = f"{name}_{k}"
        seen.add(label)
        out.append(label)
    return out


def build_rewards(specs) -> list[WeightedReward]:
    """Rewards from config entries (``name``, ``weight``, ``kwargs``), via the registry."""
    from .policy import build_named

    fns = [build_named("reward", spec.name, f"rewards.{i}.name", **spec.kwargs) for i, spec in enumerate(specs)]
    names = _unique([spec.name for spec in specs])
    return [WeightedReward(fn, float(spec.weight), name) for fn, spec, name in zip(fns, specs, names, strict=True)]


def as_weighted_rewards(rewards) -> list[WeightedReward]:
    """Reward objects given in code: callables get weight 1 and their :func:`reward_label`."""
    given = [r if isinstance(r, WeightedReward) else WeightedReward(r, 1.0, reward_label(r)) for r in rewards]
    names = _unique([r.name for r in given])
    return [WeightedReward(r.fn, r.weight, n) for r, n in zip(given, names, strict=True)]


def _as_scores(value, batch: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value).detach().float().cpu().reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"reward {name!r} returned {t.numel()} scores for {batch} samples; expected shape ({batch},)")
    return t


def _one(reward: WeightedReward, samples: torch.Tensor, prompts: Sequence[str], errors: list[str],
         failures: dict[str, str]) -> torch.Tensor:
    batch = samples.shape[0]
    try:
        return _as_scores(reward.fn(samples, list(prompts)), batch, reward.name)
    except Exception as exc:  # noqa: BLE001 - any reward failure is isolated per sample below
        log.debug("reward %r failed on the batch", reward.name, exc_info=True)
        batch_error = f"{type(exc).__name__}: {exc}"
        whole_batch = bool(getattr(exc, "whole_batch", False))
    # The batch call failed: find the samples that fail on their own, score the rest. An
    # exception marked ``whole_batch`` (e.g. a reward service that is down) fails every sample
    # alike: asking again sample by sample would only multiply the time-outs.
    out = torch.full((batch,), float("nan"))
    failed = list(range(batch)) if whole_batch else []
    last = batch_error
    for i in range(0 if failed else batch):
        try:
            out[i] = _as_scores(reward.fn(samples[i:i + 1], [prompts[i]]), 1, reward.name)[0]
        except Exception as exc:  # noqa: BLE001
            failed.append(i)
            last = f"{type(exc).__name__}: {exc}"
    if failed:
        msg = (f"reward {reward.name!r} failed on {len(failed)}/{batch} samples (dropped: {failed[:8]}); "
               f"last error: {last}")
        failures[reward.name] = last
    else:
        msg = f"reward {reward.name!r} failed on the batch but on no single sample: {batch_error}"
    errors.append(msg)
    log.warning(msg)
    return out


def score_samples(rewards: Sequence[WeightedReward], samples: torch.Tensor, prompts: Sequence[str]) -> ScoreResult:
    """Score decoded samples (B, 3, [T,] H, W) with every reward: (B, K) fp32, NaN = dropped."""
    errors: list[str] = []
    failures: dict[str, str] = {}
    cols = [_one(r, samples, prompts, errors, failures) for r in rewards]
    scores = torch.stack(cols, 1)
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        for k in bad.any(0).nonzero().flatten().tolist():
            if rewards[k].name not in failures:
                n = int(bad[:, k].sum())
                msg = f"reward {rewards[k].name!r} gave non-finite scores for {n} samples (dropped)"
                errors.append(msg)
                log.warning(msg)
                failures[rewards[k].name] = f"non-finite scores for {n}/{scores.shape[0]} samples"
    return ScoreResult(scores, errors, failures)


class AsyncScorer:
    """Scores rollout chunks in a background thread while the next chunk rolls out.

    ``submit(slice, samples, prompts)`` (the rollout's ``on_samples`` hook) queues a chunk; one
    worker scores chunks in submission order with :func:`score_samples`, so a reward never runs
    twice at once; :meth:`result` waits for all of them and returns one :class:`ScoreResult`
    over the whole batch, rows in the rollout's order. Scores are those of synchronous scoring
    as long as a reward scores each sample independently of the rest of its batch. Use it as a
    context manager: leaving it (also on an error) waits for the worker and stops it.
    """

    def __init__(self, rewards: Sequence[WeightedReward]):
        self.rewards = list(rewards)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dancegrpo-reward")
        self._jobs: list[tuple[slice, object]] = []

    def submit(self, sl: slice, samples: torch.Tensor, prompts: Sequence[str]) -> None:
        self._jobs.append((sl, self._pool.submit(score_samples, self.rewards, samples, list(prompts))))

    def result(self) -> ScoreResult:
        if not self._jobs:
            raise RuntimeError("AsyncScorer.result: no chunk was submitted")
        parts = [(sl, job.result()) for sl, job in self._jobs]
        starts = [sl.start for sl, _ in parts]
        if starts != sorted(starts) or starts[0] != 0 or any(p.stop != n.start for (p, _), (n, _) in zip(parts, parts[1:], strict=False)):
            raise RuntimeError(f"AsyncScorer.result: chunks {[sl for sl, _ in parts]} do not tile the batch")
        errors = [e for _, r in parts for e in r.errors]
        failures = {k: v for _, r in parts for k, v in r.failures.items()}
        return ScoreResult(torch.cat([r.rewards for _, r in parts]), errors, failures)

    def __enter__(self) -> AsyncScorer:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
