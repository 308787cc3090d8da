"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): reinforcement on the forward process.

One iteration (``algorithm: nft``; the math and defaults are in docs/algorithms_nft.md):

    1. roll out G samples per prompt with the *old* policy, by default with the deterministic
       ODE sampler (no log-probs are needed, so any sampler works)
    2. score them; group-normalised advantages A; optimality r = 1/2 + 1/2 clip(A / c, -1, 1)
    3. for each clean sample x0 and a few of the sampler's noise levels t: x_t = (1 - t) x0 + t eps,
       v_old = old policy on x_t (no grad), v = policy on x_t, and :func:`dancegrpo.nft_loss`
       (implicit positive / negative policies around v_old) scaled by c; AdamW as in GRPO
    4. soft-update the old policy: old <- d old + (1 - d) theta, d = min(rate (updates - start), max)
       (0 before ``decay_start``), with ``updates`` the optimizer steps so far

The old policy is a copy of the trainable parameters only. It is evaluated by swapping those
tensors into the model (``Parameter.data``, no copy) for the duration of a no-grad forward, so
it costs one extra forward and the memory of the trainable parameters (the LoRA adapters under
LoRA). Its state and the update count are saved in checkpoints, so a resumed run is exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..functional import group_advantages, nft_loss
from ..models.interface import select
from .noise import iteration_seed
from .rollout import autocast_context, collect_rollout
from .scoring import score_samples

__all__ = ["NFTAlgorithm", "optimality", "old_policy_decay"]

log = logging.getLogger("dancegrpo.trainer")


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """Optimality probabilities r in [0, 1] from advantages: 1/2 + 1/2 clamp(A / clip, -1, 1)."""
    return 0.5 + 0.5 * (advantages / clip).clamp(-1.0, 1.0)


def old_policy_decay(updates: int, *, start: int, rate: float, maximum: float) -> float:
    """The old policy's soft-update decay after ``updates`` optimizer steps (0: copy the policy)."""
    if updates < start:
        return 0.0
    return min((updates - start) * rate, maximum)


@dataclass
class NFTStats:
    losses: list[float] = field(default_factory=list)
    positive: list[float] = field(default_factory=list)
    negative: list[float] = field(default_factory=list)
    deviation: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    skipped: int = 0

    def summary(self) -> dict:
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")
        out = {"loss": mean(self.losses), "nft_positive_loss": mean(self.positive),
               "nft_negative_loss": mean(self.negative), "nft_old_deviation": mean(self.deviation),
               "grad_norm": mean(self.grad_norms), "optimizer_steps": self.optimizer_steps, "skipped": self.skipped}
        if self.kls:
            out["kl"] = mean(self.kls)
        return out


class NFTAlgorithm:
    """The DiffusionNFT iteration of a :class:`~dancegrpo.trainer.loop.Trainer` (its model,
    sampler, rewards, optimizer, generators and config)."""

    def __init__(self, trainer):
        self.tr = trainer
        if not hasattr(trainer.sampler, "sigmas"):
            raise ConfigError("algorithm=nft trains on the flow-matching forward process x_t = (1 - t) x0 + t eps: "
                              f"it needs a flow sampler (sampler.kind flow, or auto on a velocity model), got "
                              f"{type(trainer.sampler).__name__}")
        self.named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        self.old = {n: p.detach().clone() for n, p in self.named}
        self.updates = 0  # optimizer steps so far: drives the soft-update schedule
        self.ref_predict = trainer.updater.ref_predict  # the frozen base model when loss.kl_beta > 0

    # ------------------------------------------------------------------ the old policy

    @contextlib.contextmanager
    def old_weights(self):
        """The model with the old policy's trainable parameters swapped in (no copy)."""
        params = dict(self.named)
        with torch.no_grad():
            for n, p in params.items():
                p.data, self.old[n] = self.old[n], p.data
            try:
                yield
            finally:
                for n, p in params.items():
                    p.data, self.old[n] = self.old[n], p.data

    @torch.no_grad()
    def soft_update(self) -> float:
        c = self.tr.cfg.nft
        decay = old_policy_decay(self.updates, start=c.decay_start, rate=c.decay_rate, maximum=c.decay_max)
        for n, p in self.named:
            self.old[n].mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.old.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int, source: str) -> None:
        if set(state) != set(self.old):
            raise ConfigError(f"{source}: the saved old policy does not match the model's trainable parameters "
                              f"(missing {sorted(set(self.old) - set(state))[:3]}, "
                              f"unexpected {sorted(set(state) - set(self.old))[:3]})")
        with torch.no_grad():
            for n, t in state.items():
                self.old[n].copy_(t.to(self.old[n].device, self.old[n].dtype))
        self.updates = int(updates)

    # ------------------------------------------------------------------ one iteration

    def train_step(self) -> dict:
        tr, cfg = self.tr, self.tr.cfg
        c, P, G = cfg.nft, cfg.rollout.prompts_per_step, cfg.rollout.group_size
        t0 = time.perf_counter()
        # this iteration's noise (rollouts, forward process) from (seed, iteration): exact resume
        self.noise = torch.Generator(tr.device).manual_seed(iteration_seed(cfg.seed, tr.step, stream=4))
        # 1. rollouts, by the old policy (on-policy while the decay is 0)
        items = tr.dataset.sample(P, generator=tr.generators["data"])
        n_steps = tr.sampler.num_steps
        sde_mask = torch.zeros(n_steps, dtype=torch.bool) if c.deterministic_rollout else tr.selector.sde_mask(tr.step)
        policy = self.old_weights() if c.rollout_policy == "old" else contextlib.nullcontext()
        with policy:
            rollout = collect_rollout(tr.model, tr.sampler, items, G, sde_mask, self.noise,
                                      device=tr.device, share_noise=cfg.rollout.share_noise,
                                      chunk=cfg.rollout.batch_size, store_on_cpu=cfg.rollout.store_on_cpu,
                                      mixed_precision=cfg.mixed_precision, decode="final", backend=cfg.loss.backend)
        t1 = time.perf_counter()
        # 2. rewards -> advantages -> optimality probabilities
        scored = score_samples(tr.rewards, rollout.samples, rollout.prompts)
        a = cfg.advantage
        weights = torch.tensor([r.weight for r in tr.rewards])
        adv = group_advantages(scored.rewards, G, weights=weights, std=a.std, unbiased=a.unbiased, eps=a.eps,
                               clip=a.clip, aggregate=a.aggregate, nan_policy="drop", backend=cfg.loss.backend)
        valid = scored.valid
        train_idx = valid.nonzero().flatten()
        t2 = time.perf_counter()
        # 3. forward-process training on the clean samples, then 4. the old policy's soft update
        if train_idx.numel() > 0:
            x0 = rollout.latents[:, -1][train_idx.to(rollout.latents.device)]
            cond = select(rollout.cond, train_idx.to(rollout.latents.device))
            r = optimality(adv[train_idx], c.adv_clip)
            steps = self.choose_steps(train_idx.numel())
            stats = self.update(x0, cond, r, steps).summary()
        else:
            log.warning("every sample of this rollout was dropped by the rewards: no update this step")
            stats, steps = {"skipped": 1, "optimizer_steps": 0}, torch.zeros(0, 0)
        decay = self.soft_update()
        tr.record_outcome(valid, scored.failures, stats["skipped"])
        t3 = time.perf_counter()
        m = tr._metrics(scored, weights, adv, valid, train_idx, steps, stats, (t0, t1, t2, t3), rollout.batch)
        m.update({k: v for k, v in stats.items() if k.startswith("nft_")})
        m["nft_old_decay"] = decay
        # model calls times samples: the rollout's, then the old and current policy (and the KL
        # reference) at each trained noise level
        forwards = 2 + (self.ref_predict is not None)
        m["nfe_rollout"] = rollout.nfe
        m["nfe_update"] = int(train_idx.numel()) * (int(steps.shape[1]) if steps.dim() == 2 else 0) * forwards
        m["nfe"] = m["nfe_rollout"] + m["nfe_update"]
        return m

    def choose_steps(self, batch: int) -> torch.Tensor:
        """(batch, K) sampler step indices per sample, K = round(fraction * N) >= 1, drawn without
        replacement from the data generator (the noise levels t are the sampler's sigmas there)."""
        n = self.tr.sampler.num_steps
        k = max(1, round(self.tr.cfg.nft.timestep_fraction * n))
        g = self.tr.generators["data"]
        return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])

    def _micro_step(self, x0, cond, r, steps, samples, scale, stats) -> bool:
        tr, cfg = self.tr, self.tr.cfg
        c = cfg.nft
        dev = tr.device
        xs = x0[samples.to(x0.device)].to(dev)
        cs = {k: v.to(dev) for k, v in select(cond, samples.to(x0.device)).items()}
        rs = r[samples].to(dev)
        for j in range(steps.shape[1]):
            idx = steps[samples, j]
            t = tr.sampler.sigma(idx).to(device=dev, dtype=torch.float32)
            ts = tr.sampler.model_timesteps(idx).to(dev)
            noise = torch.randn(xs.shape, generator=self.noise, device=dev, dtype=torch.float32)
            col = (-1,) + (1,) * (xs.dim() - 1)
            xt = ((1 - t.view(col)) * xs.float() + t.view(col) * noise).to(xs.dtype)
            target = noise - xs.float()
            with autocast_context(dev, cfg.mixed_precision):
                with self.old_weights():
                    v_old = tr.model.predict(xt, ts, cs).detach()
                v = tr.model.predict(xt, ts, cs)
                v_ref = self.ref_predict(xt, ts, cs) if self.ref_predict is not None else None
            loss, st = nft_loss(v, v_old, target, rs, t, beta=c.beta, weighting=c.weighting,
                                backend=cfg.loss.backend)
            loss = c.adv_clip * loss  # the reference implementation's scale (r was divided by it)
            if v_ref is not None:
                kl = ((v.float() - v_ref.detach().float()) ** 2).flatten(1).mean(1).mean()
                loss = loss + cfg.loss.kl_beta * kl
                stats.kls.append(float(kl.detach()))
            value = float(loss.detach())
            if not math.isfinite(value):
                log.warning("non-finite loss (%s) at a micro-batch: this optimizer step is skipped", value)
                return False
            (loss * scale).backward()
            stats.losses.append(value)
            stats.positive.append(float(st["positive_loss"]))
            stats.negative.append(float(st["negative_loss"]))
            stats.deviation.append(float(st["old_deviation"]))
        return True

    def update(self, x0, cond, r, steps) -> NFTStats:
        """Micro-batches of ``optim.train_batch_size`` samples, ``gradient_accumulation_steps`` per
        AdamW step, each sample trained at its K noise levels (losses averaged over them)."""
        tr, o = self.tr, self.tr.cfg.optim
        up = tr.updater  # shares the gradient-norm clipping of the GRPO update
        stats = NFTStats()
        batch, k = steps.shape
        order = torch.randperm(batch, generator=tr.generators["data"])
        micro = [order[i:i + o.train_batch_size] for i in range(0, batch, o.train_batch_size)]
        groups = [micro[i:i + o.gradient_accumulation_steps] for i in range(0, len(micro), o.gradient_accumulation_steps)]
        tr.model.train(tr.cfg.update_mode == "train")
        try:
            for group in groups:
                tr.optimizer.zero_grad(set_to_none=True)
                scale = 1.0 / (len(group) * k)
                finite = all(self._micro_step(x0, cond, r, steps, mb, scale, stats) for mb in group)
                grad_norm = up._grad_norm() if finite else float("nan")
                if not finite or not math.isfinite(grad_norm):
                    tr.optimizer.zero_grad(set_to_none=True)
                    stats.skipped += 1
                    continue
                stats.grad_norms.append(grad_norm)
                tr.optimizer.step()
                stats.optimizer_steps += 1
                self.updates += 1
                if tr.ema is not None:
                    tr.ema.update()
        finally:
            tr.optimizer.zero_grad(set_to_none=True)
            tr.model.eval()
        return stats
