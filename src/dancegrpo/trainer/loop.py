"""The GRPO training loop; ``Trainer.train_step`` reads like the algorithm (docs/math.md).

    1. roll out G samples for each of P prompts with the SDE sampler (eval mode, no grad)
    2. decode, score with the reward models, group-normalised advantages
    3. pick the training timesteps
    4. for each (sample, chosen step): forward with grad, clipped-ratio loss, accumulate
    5. clip the gradient, AdamW (optional EMA)

Rollout noise is drawn per sample from (seed, iteration, global sample index, sampler step)
(trainer/noise.py); the rest that is random comes from the "data" generator (prompts, timestep
choice, shuffling, on CPU, in the same state on every rank) and torch's global RNG (dropout),
saved in checkpoints, so a resumed run repeats the uninterrupted one exactly on CPU, and a run
over N processes (torchrun; docs/distributed.md) makes the one-process run's samples.

An output_dir holds one run. A fresh run (resume=false) refuses a directory that already holds
one (checkpoints or logged steps) unless overwrite=true, which deletes that run first.
resume=true continues from the newest checkpoint that verifies (or starts afresh in an empty
directory) and refuses when the run's checkpoints are all damaged or it has logged steps but no
checkpoint. Logged steps after the checkpoint (they are run again) move to
``metrics.discarded.jsonl``; nothing a run wrote is deleted without overwrite=true.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ..distributed.runtime import describe_failure, is_collective_failure, maybe_inject_fault
from ..distributed.runtime import setup as setup_runtime
from ..errors import CheckpointError, ConfigError, RewardError, UserError
from ..functional import group_advantages
from .checkpoint import CheckpointManager, capture_rng, describe_damaged, restore_rng
from .config import TrainConfig, config_to_dict, save_config
from .ema import EMA
from .evaluate import HeldoutEval, generate
from .images import save_grid, save_reward_curve
from .logs import MetricsLogger, peak_memory_mb, read_metrics
from .lora import reference_predictor
from .nft import NFTAlgorithm
from .noise import SampleNoise
from .policy import (
    build_policy,
    build_run_dataset,
    build_run_sampler,
    check_registered,
    resolve_device,
)
from .rollout import collect_rollout
from .scoring import AsyncScorer, as_weighted_rewards, build_rewards, score_samples
from .timesteps import TimestepSelector
from .tree_rollout import tree_train_step
from .update import Updater

__all__ = ["Trainer", "train", "select_best_of_k", "RUN_OUTPUTS"]

log = logging.getLogger("dancegrpo.trainer")

# What a run writes into its output_dir and overwrite=true deletes (config.yaml is rewritten).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.discarded.jsonl", "tensorboard", "samples",
               "reward_curve.png")


def select_best_of_k(advantages: torch.Tensor, valid: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Indices of the top-k and bottom-k valid samples of each group by advantage (all valid
    members when a group has fewer than 2k). advantages, valid: (B,). Returns sorted (M,) long."""
    keep = []
    for g in range(advantages.numel() // group_size):
        members = torch.arange(g * group_size, (g + 1) * group_size)
        members = members[valid[members]]
        if members.numel() <= 2 * k:
            keep.append(members)
            continue
        order = members[advantages[members].argsort(descending=True, stable=True)]
        keep += [order[:k], order[-k:]]
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)


class Trainer:
    """A GRPO run. Objects passed in (model, rewards, dataset) replace the config's registry names,
    which is how tests and notebooks plug in their own pieces; the config still drives the rest.

    rewards: a list of callables or ``WeightedReward`` (callables get weight 1).
    """

    def __init__(self, cfg: TrainConfig, *, model=None, rewards=None, dataset=None):
        self.cfg = cfg.validate()
        self.runtime, device = setup_runtime(cfg.distributed, cfg.device)
        self.device = device if device is not None else resolve_device(cfg.device)
        rt, batch = self.runtime, cfg.rollout.prompts_per_step * cfg.rollout.group_size
        if batch % rt.dp_size:
            raise ConfigError(f"rollout.prompts_per_step * rollout.group_size = {batch} samples per step must be "
                              f"divisible by the {rt.dp_size} data-parallel processes")
        if rt.distributed and (cfg.rollout.tree is not None or cfg.algorithm == "nft"):
            what = "rollout.tree (BranchGRPO)" if cfg.rollout.tree is not None else "algorithm=nft (DiffusionNFT)"
            raise ConfigError(f"{what} runs in one process for now: launch without torchrun")
        self.out = Path(cfg.output_dir)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", keep=cfg.keep_checkpoints)
        # Cheap checks first, so a typo or a taken output_dir fails before a model loads.
        named = [("model", cfg.model.name, "model.name", model), ("dataset", cfg.data.name, "data.name", dataset)]
        named += [("reward", r.name, f"rewards.{i}.name", rewards) for i, r in enumerate(cfg.rewards)]
        for kind, name, key, given in named:
            if given is None:  # an object passed in replaces the registry name
                check_registered(kind, name, key)
        resume_path = self._claim_on_main()
        self.out.mkdir(parents=True, exist_ok=True)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        self.model = build_policy(cfg, self.device, model)
        ref = reference_predictor(self.model, cfg.lora.enabled) if cfg.loss.kl_beta > 0 else None
        self.model, ref, sync = self._parallelize(ref)
        self.sampler = build_run_sampler(cfg, self.model)
        stochastic = torch.tensor([self.sampler.is_stochastic(i) for i in range(self.sampler.num_steps)])
        t = cfg.timesteps
        self.selector = TimestepSelector(t.strategy, stochastic, fraction=t.fraction, window_size=t.window_size,
                                         window_stride=t.window_stride, window_shift_every=t.window_shift_every,
                                         window_range=t.window_range, seed=cfg.seed)
        self.dataset = dataset if dataset is not None else build_run_dataset(cfg, cfg.data.train_split)
        self.rewards = build_rewards(cfg.rewards) if rewards is None else as_weighted_rewards(rewards)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameter (requires_grad is False everywhere)")
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps,
                                           weight_decay=o.weight_decay)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.ema = EMA(named, o.ema_decay) if o.ema_decay > 0 else None
        self.updater = Updater(self.model, self.params, self.optimizer, train_batch_size=o.train_batch_size,
                               accumulation=o.gradient_accumulation_steps, max_grad_norm=o.max_grad_norm,
                               clip_range=cfg.loss.clip_range, clip_range_high=cfg.loss.clip_range_high,
                               kl_beta=cfg.loss.kl_beta, ref_predict=ref, ema=self.ema,
                               mixed_precision=cfg.mixed_precision, update_mode=cfg.update_mode,
                               ratio_tolerance=cfg.ratio_tolerance, backend=cfg.loss.backend, device=self.device,
                               sync=sync, ratio_norm=cfg.loss.ratio_norm)
        self.nft = NFTAlgorithm(self) if cfg.algorithm == "nft" else None
        self.generators = {
            "data": torch.Generator("cpu").manual_seed(cfg.seed * 1000 + 2),
        }
        self.heldout = HeldoutEval(cfg, self.rewards, self.device) if cfg.eval.every else None
        self.step = 0
        self.skipped_total = 0
        self.invalid_streak = 0  # consecutive steps in which no sample had a valid reward
        self.last_failures: dict[str, str] = {}
        self.resumed_from = None
        if resume_path is not None:
            self._resume(resume_path)
        # overwrite is what this command did to output_dir, not part of the run: a later
        # `resume=true` from the saved config must not meet it
        self.recorded_cfg = dataclasses.replace(cfg, overwrite=False)
        if rt.is_main:
            save_config(self.recorded_cfg, self.out / "config.yaml")

    def _parallelize(self, ref):
        """Shard (fsdp) or replicate (ddp) the policy over the ranks; ``(model, ref, sync)``."""
        from ..distributed.parallel import GradSync, broadcast_weights, shard_policy

        rt, d, model = self.runtime, self.cfg.distributed, self.model
        params = lambda m: [p for p in m.parameters() if p.requires_grad]
        if not rt.distributed:
            return model, ref, GradSync(rt, params(model))
        if rt.sequence_parallel > 1:  # before wrapping: it installs the all-to-all in the blocks
            from ..distributed.sequence_parallel import apply_sequence_parallel

            apply_sequence_parallel(model, rt.sequence_parallel)
            if ref is not None and getattr(ref, "module", None) is not None:
                apply_sequence_parallel(ref.module, rt.sequence_parallel)
        if d.strategy == "fsdp":
            model, ref = shard_policy(model, ref, rt, self.cfg.mixed_precision, d.reference)
            return model, ref, GradSync(rt, params(model), lockstep=True)
        broadcast_weights(model, rt)
        if ref is not None and getattr(ref, "module", None) is not None:
            broadcast_weights(ref.module, rt)
        return model, ref, GradSync(rt, params(model))

    def _claim_on_main(self) -> Path | None:
        """Rank 0 checks (and with overwrite=true clears) output_dir; every rank gets its answer."""
        rt = self.runtime
        if not rt.distributed:
            return self._claim_output_dir()
        answer = None
        if rt.is_main:
            try:
                answer = (None, self._claim_output_dir())
            except UserError as exc:
                answer = (exc, None)
        error, path = rt.broadcast_object(answer)
        if error is not None:
            raise error
        return path

    def _claim_output_dir(self) -> Path | None:
        """Check what output_dir holds against resume / overwrite; the checkpoint to resume from."""
        cfg, out = self.cfg, self.out
        steps = self.checkpoints.step_dirs()
        logged = len(read_metrics(out / "metrics.jsonl"))
        held = ", ".join(([f"checkpoints up to step {steps[0][0]}"] if steps else []) +
                         ([f"{logged} logged steps in metrics.jsonl"] if logged else []))
        if cfg.overwrite:
            if held:
                log.warning("overwrite=true: deleting the run in %s (%s)", out, held)
                for name in RUN_OUTPUTS:
                    p = out / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink(missing_ok=True)
            return None
        if not cfg.resume:
            if held:
                raise ConfigError(f"output_dir {str(out)!r} already holds a run ({held}): pass resume=true to continue "
                                  "it, overwrite=true to delete it and start again, or choose another output_dir")
            return None
        if steps:
            path, damaged = self.checkpoints.scan()
            if path is None:
                raise CheckpointError(f"resume=true but every checkpoint in {self.checkpoints.root} is damaged "
                                      f"({describe_damaged(damaged)}); nothing was changed. Move them away to start "
                                      "again, or pass overwrite=true (deletes the run)")
            return path
        if logged:
            raise ConfigError(f"resume=true but output_dir {str(out)!r} has no checkpoint, only {logged} logged steps "
                              "in metrics.jsonl: pass overwrite=true to delete them and start again, or choose another "
                              "output_dir")
        log.info("resume=true and %s holds no run yet: starting from step 0", out)
        return None

    # ------------------------------------------------------------------ one iteration

    def train_step(self) -> dict:
        cfg, P, G, rt = self.cfg, self.cfg.rollout.prompts_per_step, self.cfg.rollout.group_size, self.runtime
        if self.nft is not None:  # DiffusionNFT: its own iteration (trainer/nft.py)
            return self.nft.train_step()
        if cfg.rollout.tree is not None:  # BranchGRPO: tree rollouts, depth-wise advantages per edge
            return tree_train_step(self)
        t0 = time.perf_counter()
        # 1. rollouts: G samples of each of P prompts (the same prompts on every rank); this rank
        # makes its contiguous share of the P * G samples, each from its own global-index noise
        items = self.dataset.sample(P, generator=self.generators["data"])
        sde_mask = self.selector.sde_mask(self.step)
        per_rank = P * G // rt.dp_size
        lo = rt.dp_rank * per_rank
        ids = torch.arange(lo, lo + per_rank)
        noise = SampleNoise(cfg.seed, self.step, ids, ids // G, cfg.rollout.share_noise)
        with contextlib.ExitStack() as stack:  # async_rewards: chunks scored while the next rolls out
            scorer = stack.enter_context(AsyncScorer(self.rewards)) if cfg.rollout.async_rewards else None
            rollout = collect_rollout(self.model, self.sampler, items, G, sde_mask, None,
                                      device=self.device, share_noise=cfg.rollout.share_noise,
                                      chunk=cfg.rollout.batch_size, store_on_cpu=cfg.rollout.store_on_cpu,
                                      mixed_precision=cfg.mixed_precision, decode=cfg.rollout.decode,
                                      backend=cfg.loss.backend, noise=noise, rows=slice(lo, lo + per_rank),
                                      on_samples=scorer and scorer.submit, keep_outputs=cfg.loss.ratio_norm)
            t1 = time.perf_counter()
            # 2. rewards (a failing sample is dropped: NaN) of this rank's samples, gathered;
            # advantages over whole groups
            scored = self._gather_scores(scorer.result() if scorer
                                         else score_samples(self.rewards, rollout.samples, rollout.prompts))
        a = cfg.advantage
        weights = torch.tensor([r.weight for r in self.rewards])
        adv = group_advantages(scored.rewards, group_ids=torch.arange(P * G) // G, weights=weights, std=a.std,
                               unbiased=a.unbiased, eps=a.eps, clip=a.clip, aggregate=a.aggregate, nan_policy="drop",
                               backend=cfg.loss.backend)
        valid = scored.valid
        train_idx = (select_best_of_k(adv, valid, G, a.best_of_k) if a.best_of_k > 0
                     else valid.nonzero().flatten())
        t2 = time.perf_counter()
        # 3-5. timesteps, per-(sample, step) clipped loss, accumulate, clip, AdamW, EMA
        if train_idx.numel() > 0:
            steps = self.selector.choose(sde_mask, train_idx.numel(), self.generators["data"])
            mine = (train_idx >= lo) & (train_idx < lo + per_rank)
            rows = torch.where(mine, train_idx - lo, torch.full_like(train_idx, -1))
            stats = self.updater.run(rollout, adv[train_idx], steps, self.generators["data"], rows=rows).summary()
        else:
            log.warning("every sample of this rollout was dropped by the rewards: no update this step")
            stats, steps = {"skipped": 1, "optimizer_steps": 0}, torch.zeros(0, 0)
        self.record_outcome(valid, scored.failures, stats["skipped"])
        t3 = time.perf_counter()
        m = self._metrics(scored, weights, adv, valid, train_idx, steps, stats, (t0, t1, t2, t3), P * G)
        # model calls times samples, over every rank (each data-parallel slot rolls out its share)
        m["nfe_rollout"], m["nfe_update"] = rollout.nfe * rt.dp_size, stats.get("nfe", 0)
        m["nfe"] = m["nfe_rollout"] + m["nfe_update"]
        return m

    def _gather_scores(self, scored):
        """Every rank's rewards in global sample order (and their errors)."""
        rt = self.runtime
        if not rt.distributed:
            return scored
        rewards = rt.gather_samples(scored.rewards.float())
        notes = rt.gather_objects((scored.errors, scored.failures))[:: rt.sequence_parallel]
        failures = {}
        for _, f in notes:
            failures.update(f)
        return dataclasses.replace(scored, rewards=rewards, errors=[e for errs, _ in notes for e in errs],
                                   failures=failures)

    def record_outcome(self, valid: torch.Tensor, failures: dict, skipped: int) -> None:
        """What every algorithm's step records: the streak of steps without a valid reward (and
        why, for max_invalid_steps' message) and the count of skipped updates."""
        if bool(valid.any()):
            self.invalid_streak, self.last_failures = 0, {}
        else:
            self.invalid_streak += 1
            self.last_failures = {**self.last_failures, **failures}
        self.skipped_total += skipped

    def _metrics(self, scored, weights, adv, valid, train_idx, steps, stats, times, batch) -> dict:
        r = scored.rewards
        total = (r[valid] * weights).sum(1)
        m = {
            "reward_mean": float(total.mean()) if total.numel() else float("nan"),
            "reward_std": float(total.std()) if total.numel() > 1 else 0.0,
        }
        for k, rw in enumerate(self.rewards):
            col = r[:, k][torch.isfinite(r[:, k])]
            m[f"reward_{rw.name}_mean"] = float(col.mean()) if col.numel() else float("nan")
            m[f"reward_{rw.name}_std"] = float(col.std()) if col.numel() > 1 else 0.0
        av = adv[valid]
        m.update({
            "adv_mean": float(av.mean()) if av.numel() else float("nan"),
            "adv_std": float(av.std()) if av.numel() > 1 else 0.0,
            "adv_abs_max": float(av.abs().max()) if av.numel() else float("nan"),
            "adv_zero_frac": float((av == 0).float().mean()) if av.numel() else float("nan"),
            "dropped": int((~valid).sum()),
            "trained_samples": int(train_idx.numel()),
            "trained_steps": int(steps.shape[1]) if steps.dim() == 2 else 0,
        })
        for key in ("loss", "clip_fraction", "approx_kl", "ratio_mean", "ratio_first_update", "grad_norm", "kl"):
            if key in stats:
                m[key] = stats[key]
        m.setdefault("loss", float("nan"))
        m.setdefault("ratio_first_update", float("nan"))
        m.setdefault("clip_fraction", float("nan"))
        m.setdefault("grad_norm", float("nan"))
        t0, t1, t2, t3 = times
        m.update({
            "skipped": stats["skipped"], "skipped_total": self.skipped_total,
            "optimizer_steps": stats["optimizer_steps"], "lr": self.optimizer.param_groups[0]["lr"],
            "time_rollout": t1 - t0, "time_reward": t2 - t1, "time_update": t3 - t2, "time_step": t3 - t0,
            "samples_per_s": batch / max(t3 - t0, 1e-9), "peak_memory_mb": peak_memory_mb(self.device),
        })
        if scored.errors:
            m["reward_errors"] = len(scored.errors)
        return m

    # ------------------------------------------------------------------ the run

    def train(self) -> list[dict]:
        """Run until ``max_steps``; returns the per-step metrics (global ones on every rank; rank 0
        alone writes them, the grids and the progress bar)."""
        rt = self.runtime
        try:
            return self._train()
        except RuntimeError as exc:
            if rt.distributed and is_collective_failure(exc):
                raise describe_failure(rt, exc) from exc
            raise
        finally:
            rt.close()

    def _train(self) -> list[dict]:
        cfg, rt = self.cfg, self.runtime
        logger = _NoLogger()
        if rt.is_main:
            logger = MetricsLogger(self.out, tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                                   total=cfg.max_steps, initial=self.step)
            if self.resumed_from is not None:
                logger.rewind_to(self.step)  # steps logged after the checkpoint run again
        history = []
        saved_step = self.step if self.resumed_from is not None else None
        try:
            if cfg.log.sample_every and self.step == 0:
                self.save_samples()  # the "before" grid
            while self.step < cfg.max_steps:
                maybe_inject_fault(rt, self.step)
                metrics = self.train_step()
                self.step += 1
                metrics = {"step": self.step, **metrics}
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    metrics.update(self.heldout.evaluate(self.model, self.sampler))
                logger.log(metrics)
                history.append(metrics)
                if cfg.max_invalid_steps and self.invalid_streak >= cfg.max_invalid_steps:
                    raise RewardError(self._invalid_message())
                if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                    self.save_samples()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_step = self.step
            if self.step > 0 and saved_step != self.step:
                self.save_checkpoint()
            if cfg.log.num_sample_prompts and not (cfg.log.sample_every and self.step % cfg.log.sample_every == 0):
                self.save_samples()
            if rt.is_main:
                self.save_reward_curve()
        finally:
            logger.close()
        return history

    def _invalid_message(self) -> str:
        n = self.invalid_streak
        failed = "; ".join(f"reward {name!r}: {why}" for name, why in self.last_failures.items())
        resume = self.checkpoints.latest()
        after = f"; the last checkpoint is {resume}" if resume is not None else ""
        return (f"no sample had a valid reward in {n} steps in a row (max_invalid_steps={self.cfg.max_invalid_steps}), "
                f"stopped at step {self.step}: {failed or 'every sample was dropped'}{after}")

    def save_samples(self) -> Path | None:
        """A grid of the fixed prompts (PNG, or GIF for video) in ``output_dir/samples``."""
        n, rt = self.cfg.log.num_sample_prompts, self.runtime
        # a sharded or sequence-parallel model needs every rank in its forwards; a replicated one
        # only rank 0
        together = self.cfg.distributed.strategy == "fsdp" or rt.sequence_parallel > 1
        if n <= 0 or not (rt.is_main or together):
            return None
        items = self.dataset.fixed(n)
        e = self.cfg.eval
        samples, _ = generate(self.model, self.sampler, items, mode=e.mode, seed=e.seed, device=self.device,
                              batch_size=e.batch_size, mixed_precision=self.cfg.mixed_precision,
                              backend=self.cfg.loss.backend)
        if not rt.is_main:
            return None
        (self.out / "samples").mkdir(exist_ok=True)
        return save_grid(samples, self.out / "samples" / f"step_{self.step:06d}")

    def save_reward_curve(self) -> Path:
        rows = read_metrics(self.out / "metrics.jsonl")
        heldout = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r if k.startswith("heldout/")})}
        return save_reward_curve([r["step"] for r in rows], [r.get("reward_mean") for r in rows],
                                 self.out / "reward_curve.png", extra=heldout)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path | None:
        """Every rank writes its shard (torch.distributed.checkpoint); rank 0 the rest. Returns the
        checkpoint's path on rank 0, None on the other ranks."""
        sharded = self.runtime.distributed and self.cfg.distributed.strategy == "fsdp"
        path = self.checkpoints.save(
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainable_only=self.cfg.lora.enabled,
            rng_state=capture_rng(self.generators),
            run_state={"skipped_total": self.skipped_total, "lora": self.cfg.lora.enabled,
                       **({"nft_updates": self.nft.updates} if self.nft is not None else {})},
            config_yaml=yaml.safe_dump(config_to_dict(self.recorded_cfg), sort_keys=False),
            ema=self.ema.shadow if self.ema is not None else None,
            old_policy_state=self.nft.state_dict() if self.nft is not None else None,
            export=None if sharded else self._export_weights(),  # the export reads whole weights
        )
        log.info("saved checkpoint %s", path)
        return path

    def _export_weights(self):
        """The model's own-format export (diffusers adapters: ``lora/`` or the denoiser folder)."""
        export = getattr(self.model, "export_checkpoint", None)
        if not callable(export):
            return None
        return lambda directory: export(directory, lora=self.cfg.lora.enabled)

    def _resume(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if bool(state.get("lora", False)) != self.cfg.lora.enabled:
            raise ConfigError(f"checkpoint {path} was trained with lora.enabled={state.get('lora')}, "
                              f"this run has lora.enabled={self.cfg.lora.enabled}")
        if self.ema is not None and not (path / "ema.safetensors").is_file():
            raise ConfigError(f"checkpoint {path} has no EMA state but optim.ema_decay > 0")
        ckpt = self.checkpoints.restore(path, model=self.model, optimizer=self.optimizer,
                                        ema=self.ema.shadow if self.ema is not None else None,
                                        trainable_only=self.cfg.lora.enabled)
        if self.nft is not None:
            if "old_policy" not in ckpt:
                raise ConfigError(f"checkpoint {path} has no DiffusionNFT old policy (it was not an algorithm=nft run)")
            self.nft.load_state_dict(ckpt["old_policy"], ckpt["state"].get("nft_updates", 0), f"checkpoint {path}")
        restore_rng(ckpt["rng"], self.generators)
        self.step = int(ckpt["state"]["step"])
        self.skipped_total = int(ckpt["state"].get("skipped_total", 0))
        self.resumed_from = path
        old = yaml.safe_load(ckpt["config_yaml"]) or {}
        changed = _diff(old, config_to_dict(self.cfg))
        changed = [k for k in changed if k not in ("max_steps", "resume", "overwrite")]
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        log.info("resumed from %s at step %d", path, self.step)


class _NoLogger:
    """What ranks other than 0 log: nothing."""

    def log(self, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b)):
        return [prefix[:-1]]
    return []


def train(cfg: TrainConfig, **objects) -> list[dict]:
    """Build a :class:`Trainer` for ``cfg`` and run it; returns the per-step metrics."""
    return Trainer(cfg, **objects).train()
