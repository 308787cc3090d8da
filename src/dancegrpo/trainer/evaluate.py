"""Generating with a policy, and scoring it on held-out prompts (``dancegrpo sample`` / ``eval``).

Generation reuses the rollout sampler (one implementation of the sampling loop): ``mode="ode"``
is the deterministic sampler (eta = 0 everywhere), ``mode="sde"`` the training sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rollout import collect_rollout
from .scoring import WeightedReward, score_samples

__all__ = ["generate", "generate_as_eval", "evaluate_policy", "evaluate_samples", "evaluate_config",
           "evaluate_config_samples", "first_samples", "best_of_n", "HeldoutEval"]


def generate(model, sampler, items: Sequence, *, samples_per_prompt: int = 1, mode: str = "ode", seed: int = 0,
             device="cpu", batch_size: int = 32, mixed_precision: str = "no", backend: str = "auto"):
    """Samples for each prompt item: ``(samples (B, 3, [T,] H, W) in [0, 1], prompts (B,))``,
    B = len(items) * samples_per_prompt, each prompt's samples contiguous. Deterministic in
    ``seed``; every sample has its own initial noise."""
    if mode not in ("ode", "sde"):
        raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}")
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(int(seed))
    if mode == "ode":
        mask = torch.zeros(sampler.num_steps, dtype=torch.bool)
    else:
        mask = torch.tensor([sampler.is_stochastic(i) for i in range(sampler.num_steps)])
    per_call = max(1, batch_size // samples_per_prompt)
    outs, prompts = [], []
    for start in range(0, len(items), per_call):
        chunk = list(items[start:start + per_call])
        r = collect_rollout(model, sampler, chunk, samples_per_prompt, mask, gen, device=device, share_noise=False,
                            mixed_precision=mixed_precision, decode="x0", backend=backend)
        outs.append(r.samples)
        prompts += r.prompts
    return torch.cat(outs), prompts


def evaluate_policy(model, sampler, items: Sequence, rewards: Sequence[WeightedReward], **gen_kwargs) -> dict:
    """Reward statistics of a policy on ``items`` (``generate``, then ``evaluate_samples``)."""
    samples, prompts = generate(model, sampler, items, **gen_kwargs)
    return evaluate_samples(samples, prompts, rewards, num_prompts=len(items))


def evaluate_samples(samples: torch.Tensor, prompts: Sequence[str], rewards: Sequence[WeightedReward], *,
                     num_prompts: int) -> dict:
    """Reward statistics of generated samples: reward_mean (weighted sum of the rewards),
    per-reward mean/std, ``correct_rate`` for rewards that offer ``correct``, dropped count."""
    scored = score_samples(rewards, samples, prompts)
    r, valid = scored.rewards, scored.valid
    w = torch.tensor([rw.weight for rw in rewards])
    total = (r[valid] * w).sum(1)
    out = {
        "reward_mean": float(total.mean()) if total.numel() else float("nan"),
        "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        "num_samples": int(r.shape[0]),
        "num_prompts": num_prompts,
        "dropped": int((~valid).sum()),
    }
    for k, rw in enumerate(rewards):
        col = r[:, k][torch.isfinite(r[:, k])]
        out[f"reward_{rw.name}_mean"] = float(col.mean()) if col.numel() else float("nan")
        out[f"reward_{rw.name}_std"] = float(col.std()) if col.numel() > 1 else 0.0
        correct = getattr(rw.fn, "correct", None)
        if callable(correct):
            c = torch.as_tensor(correct(samples, list(prompts))).reshape(-1).bool().cpu()
            key = "correct_rate" if "correct_rate" not in out else f"correct_rate_{rw.name}"
            out[key] = float(c.float().mean())
    if scored.errors:
        out["errors"] = scored.errors
    return out


def evaluate_config(model, cfg, *, device="cpu", extra_rewards: Sequence[WeightedReward] = ()) -> dict:
    """The evaluation of ``model`` under run config ``cfg`` (``dancegrpo eval``, the demo, the
    shapes base models' ``eval.json``): the first ``cfg.eval.num_prompts`` fixed prompts of the
    dataset's ``eval_split``, the run's sampler in ``cfg.eval.mode`` (deterministic by default),
    the run's rewards. ``extra_rewards`` are scored alongside (weight 0 keeps ``reward_mean``)."""
    return evaluate_config_samples(model, cfg, device=device, extra_rewards=extra_rewards)[0]


def evaluate_config_samples(model, cfg, *, device="cpu", extra_rewards: Sequence[WeightedReward] = ()):
    """``evaluate_config`` that also returns what it scored: ``(stats, samples, items)``, for
    callers that look at the samples themselves (grids, diagnostics) without generating twice."""
    from .policy import build_run_dataset
    from .scoring import build_rewards

    e = cfg.eval
    items = build_run_dataset(cfg, cfg.data.eval_split).fixed(e.num_prompts)
    rewards = build_rewards(cfg.rewards) + list(extra_rewards)
    samples, prompts = generate_as_eval(model, cfg, items, samples_per_prompt=e.samples_per_prompt, device=device)
    return evaluate_samples(samples, prompts, rewards, num_prompts=len(items)), samples, items


def generate_as_eval(model, cfg, items: Sequence, *, samples_per_prompt: int = 1, device="cpu"):
    """``generate`` on ``items`` the way ``cfg``'s evaluation does: the run's sampler in
    ``cfg.eval.mode``, with its seed, batch size, precision and backend."""
    from .policy import build_run_sampler

    e = cfg.eval
    return generate(model, build_run_sampler(cfg, model), items, samples_per_prompt=samples_per_prompt, mode=e.mode,
                    seed=e.seed, device=device, batch_size=e.batch_size, mixed_precision=cfg.mixed_precision,
                    backend=cfg.loss.backend)


def first_samples(model, cfg, samples: torch.Tensor, n: int, *, device="cpu") -> torch.Tensor:
    """One sample for each of the first ``n`` fixed eval prompts (a grid): taken from
    ``evaluate_config_samples``'s ``samples`` when they cover ``n`` prompts, else generated with
    the evaluation's sampler, mode and seed."""
    from .policy import build_run_dataset

    e = cfg.eval
    if e.num_prompts >= n:
        return samples[::e.samples_per_prompt][:n]
    return generate_as_eval(model, cfg, build_run_dataset(cfg, cfg.data.eval_split).fixed(n), device=device)[0]


class HeldoutEval:
    """The over-optimisation guard run every ``eval.every`` training steps: the fixed prompts of
    the dataset's eval split, sampled deterministically (``eval.mode``, ``eval.seed``: the same
    noise every time), scored by the trained rewards and by ``eval.heldout_rewards`` (never
    trained on). Returns metrics ``heldout/<name>`` (each reward's mean), ``heldout/reward_mean``
    (the trained weighted sum) and ``heldout/correct_rate`` where a reward offers ``correct``:
    a trained reward that climbs while the held-out ones fall is reward hacking."""

    def __init__(self, cfg, trained: Sequence[WeightedReward], device):
        from ..registry import build_dataset
        from .scoring import build_rewards

        e = cfg.eval
        self.cfg, self.device = cfg, device
        self.items = build_dataset(cfg.data.name, split=cfg.data.eval_split, **cfg.data.kwargs).fixed(e.num_prompts)
        same = [i for i, h in enumerate(e.heldout_rewards)
                if any(h.name == r.name and h.kwargs == r.kwargs for r in cfg.rewards)]
        if same:
            raise ValueError(f"eval.heldout_rewards.{same[0]} ({e.heldout_rewards[same[0]].name!r}) is a trained reward "
                             "(same name and kwargs as one in rewards): a held-out reward must be one not trained on")
        extra = build_rewards(e.heldout_rewards) if e.heldout_rewards else []
        taken = {r.name for r in trained}
        # held-out rewards carry weight 0: measured, never part of the trained sum; a name shared
        # with a trained reward (other kwargs) gets a "_heldout" suffix
        self.rewards = list(trained) + [WeightedReward(r.fn, 0.0, r.name + ("_heldout" if r.name in taken else ""))
                                        for r in extra]

    def evaluate(self, model, sampler) -> dict:
        e = self.cfg.eval
        out = evaluate_policy(model, sampler, self.items, self.rewards, samples_per_prompt=e.samples_per_prompt,
                              mode=e.mode, seed=e.seed, device=self.device, batch_size=e.batch_size,
                              mixed_precision=self.cfg.mixed_precision, backend=self.cfg.loss.backend)
        m = {"heldout/reward_mean": out["reward_mean"]}
        for rw in self.rewards:
            m[f"heldout/{rw.name}"] = out[f"reward_{rw.name}_mean"]
        for k, v in out.items():
            if k.startswith("correct_rate"):
                m[f"heldout/{k}"] = v
        return m


def best_of_n(samples: torch.Tensor, prompts: Sequence[str], k: int, reward: WeightedReward | None):
    """Best-of-k: in each run of ``k`` consecutive samples (same prompt) keep the one ``reward``
    scores highest. Returns ``(samples, prompts, scores)``; with ``k == 1`` or no reward
    everything is kept (scores None without a reward)."""
    if reward is None:
        return samples, list(prompts), None
    scores = score_samples([reward], samples, prompts).rewards[:, 0]
    if k <= 1:
        return samples, list(prompts), scores
    if samples.shape[0] % k:
        raise ValueError(f"best-of-{k} needs a multiple of {k} samples, got {samples.shape[0]}")
    keep = [g * k + int(scores[g * k:(g + 1) * k].nan_to_num(float("-inf")).argmax())
            for g in range(samples.shape[0] // k)]
    idx = torch.tensor(keep)
    return samples[idx.to(samples.device)], [prompts[i] for i in keep], scores[idx]
