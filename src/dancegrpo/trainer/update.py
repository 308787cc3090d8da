"""The policy update (steps 4-5 of the loop in loop.py).

For each (sample, chosen step) the model is forwarded with grad and
:func:`dancegrpo.grpo_step_loss` gives the clipped-ratio loss of the stored next latent (plus
the exact Gaussian KL to the reference when ``kl_beta > 0``). Each micro-batch's summed loss is
scaled by ``1 / (the optimizer step's (sample, step) pairs over all ranks)`` and accumulated, so
the gradient is the mean over the pairs whatever their split over micro-batches and processes;
then the gradient norm (global) is clipped and AdamW steps, and the EMA follows.

A non-finite loss or gradient skips the optimizer step: the gradient is dropped, the weights,
the optimizer state and the EMA are untouched, and the skip is counted.

The ratio check: at the first update after a rollout the weights are the ones that produced
the rollout, so the mean ratio must be 1. When it is not, the training forward computes
something else than the rollout forward did (see ``RATIO_CAUSES``).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch

from ..distributed.parallel import GradSync, clip_grads, global_grad_norm
from ..functional import grpo_step_loss
from .rollout import Rollout, autocast_context

__all__ = ["Updater", "UpdateStats", "RatioCheckWarning", "RATIO_CAUSES"]

log = logging.getLogger("dancegrpo.trainer")

RATIO_CAUSES = ("the training forward differs from the rollout forward. Likely causes: "
                "(1) train/eval mode: dropout or norm layers behave differently (update_mode=eval, or remove dropout); "
                "(2) batch shape: a model whose output depends on the batch composition (batch norm, rollout.batch_size "
                "vs optim.train_batch_size); (3) dtype: rollout and training run in different precisions "
                "(mixed_precision, a model cast between phases); (4) torch.compile / fused kernels used in one phase only; "
                "(5) the weights changed between rollout and update (an optimizer step, EMA copied in, LoRA toggled)")


class RatioCheckWarning(RuntimeWarning):
    """The mean importance ratio at the first update after a rollout is not 1."""


@dataclass
class UpdateStats:
    """Sums over the trained (sample, step) pairs (so the means are per pair, over all ranks)."""
    pairs: float = 0.0
    loss: float = 0.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    ratio: float = 0.0
    kl: float = 0.0
    first_pairs: float = 0.0
    first_ratio: float = 0.0
    has_kl: bool = False
    grad_norms: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    skipped: int = 0
    nfe: int = 0  # network evaluations (per sample) of the update: policy and reference forwards

    def add(self, n: int, loss: float, st: dict, first: bool) -> None:
        self.pairs += n
        self.loss += n * loss
        self.clip_fraction += n * float(st["clip_fraction"])
        self.approx_kl += n * float(st["approx_kl"])
        self.ratio += n * float(st["ratio_mean"])
        if "kl" in st:
            self.kl += n * float(st["kl"])
            self.has_kl = True
        if first:
            self.first_pairs += n
            self.first_ratio += n * float(st["ratio_mean"])

    def reduce(self, sync: GradSync) -> UpdateStats:
        """The sums over every rank (grad norms, steps and skips are already global)."""
        names = ("pairs", "loss", "clip_fraction", "approx_kl", "ratio", "kl", "first_pairs", "first_ratio", "nfe")
        for name, v in zip(names, sync.sum([getattr(self, n) for n in names]), strict=True):
            setattr(self, name, v)
        return self

    def summary(self) -> dict:
        per = lambda total, n: float(total / n) if n else float("nan")
        out = {
            "loss": per(self.loss, self.pairs), "clip_fraction": per(self.clip_fraction, self.pairs),
            "approx_kl": per(self.approx_kl, self.pairs), "ratio_mean": per(self.ratio, self.pairs),
            "ratio_first_update": per(self.first_ratio, self.first_pairs),
            "grad_norm": per(sum(self.grad_norms), len(self.grad_norms)),
            "optimizer_steps": self.optimizer_steps, "skipped": self.skipped, "nfe": int(self.nfe),
        }
        if self.has_kl:
            out["kl"] = per(self.kl, self.pairs)
        return out


class Updater:
    """Holds what the update needs: the model, its trainable parameters, AdamW, EMA, reference.

    ref_predict: ``(x, t, cond) -> v_ref`` or None (no KL). sync: how gradients and statistics
    meet those of the other ranks (:class:`~dancegrpo.distributed.parallel.GradSync`; the
    default is one process).
    """

    def __init__(self, model, params, optimizer, *, train_batch_size: int, accumulation: int, max_grad_norm: float,
                 clip_range: float, clip_range_high, kl_beta: float, ref_predict=None, ema=None,
                 mixed_precision: str = "no", update_mode: str = "train", ratio_tolerance: float = 1e-3,
                 backend: str = "auto", device="cpu", sync: GradSync | None = None, ratio_norm: bool = False):
        self.model, self.params, self.optimizer = model, list(params), optimizer
        self.train_batch_size, self.accumulation = int(train_batch_size), int(accumulation)
        self.max_grad_norm = float(max_grad_norm)
        self.clip_range, self.clip_range_high, self.kl_beta = clip_range, clip_range_high, float(kl_beta)
        self.ref_predict, self.ema = ref_predict, ema
        self.mixed_precision, self.update_mode = mixed_precision, update_mode
        self.ratio_tolerance, self.backend = float(ratio_tolerance), backend
        self.ratio_norm = bool(ratio_norm)
        self.device = torch.device(device)
        self.sync = sync if sync is not None else GradSync(params=self.params)

    def _grad_norm(self) -> float:
        if not any(p.grad is not None for p in self.params):
            return 0.0
        norm = global_grad_norm(self.params)
        if self.max_grad_norm > 0 and math.isfinite(float(norm)):
            clip_grads(self.params, self.max_grad_norm, norm)
        return float(norm)

    def _micro_step(self, rollout: Rollout, rows, pos, steps, advantages, scale, stats, first) -> bool:
        """Forward + backward of the trained samples ``pos`` (positions in ``steps``; ``rows[pos]``
        their rows in ``rollout``) over their K chosen steps. False on a non-finite loss."""
        k = steps.shape[1]
        adv = advantages[pos].to(self.device)
        finite = True
        for j in range(k):
            x, y, t, coeffs, old_logp, cond = rollout.step_batch(rows[pos], steps[pos, j], self.device)
            with autocast_context(self.device, self.mixed_precision):
                v = self.model.predict(x, t, cond)
                v_ref = self.ref_predict(x, t, cond) if self.ref_predict is not None else None
            stats.nfe += x.shape[0] * (2 if v_ref is not None else 1)
            v_old = rollout.old_outputs(rows[pos], steps[pos, j], self.device) if self.ratio_norm else None
            loss, st = grpo_step_loss(v, x, y, coeffs, old_logp, adv, clip_range=self.clip_range,
                                      clip_range_high=self.clip_range_high, ref_model_output=v_ref,
                                      beta=self.kl_beta, backend=self.backend, ratio_norm=self.ratio_norm,
                                      old_model_output=v_old)
            value = float(loss.detach())
            if not math.isfinite(value):
                log.warning("non-finite loss (%s) at a micro-batch: this optimizer step is skipped", value)
                if not self.sync.lockstep:
                    return False
                finite = False  # the other ranks wait for this backward's collectives
            # loss is the mean over this micro-batch: times its size / all ranks' pairs = the global mean
            (loss * (len(pos) * scale)).backward()
            if finite:
                stats.add(len(pos), value, st, first)
        return finite

    def _pad_step(self, rollout: Rollout, steps) -> None:
        """A zero-weight forward + backward: this rank has no more samples in the optimizer step
        but the sharded model needs every rank in every gather and reduction."""
        rows = torch.zeros(1, dtype=torch.long)
        for j in range(steps.shape[1]):
            x, _, t, _, _, cond = rollout.step_batch(rows, steps[:1, j], self.device)
            with autocast_context(self.device, self.mixed_precision):
                v = self.model.predict(x, t, cond)
                if self.ref_predict is not None:
                    self.ref_predict(x, t, cond)
            (v.float().sum() * 0).backward()

    def run(self, rollout: Rollout, advantages: torch.Tensor, steps: torch.Tensor,
            generator: torch.Generator, rows: torch.Tensor | None = None) -> UpdateStats:
        """One pass over the M trained samples of the whole batch. advantages (M,) fp32; steps
        (M, K) long from the selector; rows (M,) long: each sample's row in ``rollout`` on this
        rank, -1 where another rank holds it (default ``arange(M)``: one process). generator
        (CPU, in the same state on every rank) shuffles the samples into optimizer steps of
        ``train_batch_size * accumulation`` samples (over all ranks); each rank forwards its own
        ones ``train_batch_size`` at a time."""
        stats = UpdateStats()
        batch, k = steps.shape
        rows = torch.arange(batch) if rows is None else rows
        order = torch.randperm(batch, generator=generator)
        per_step = self.train_batch_size * self.accumulation
        groups = [order[i:i + per_step] for i in range(0, batch, per_step)]
        self.model.train(self.update_mode == "train")
        first = True
        for group in groups:
            self.optimizer.zero_grad(set_to_none=True)
            mine = group[rows[group] >= 0]
            micro = [mine[i:i + self.train_batch_size] for i in range(0, mine.numel(), self.train_batch_size)]
            scale = 1.0 / (group.numel() * k)
            finite = True
            # lockstep (sharded weights): as many passes on every rank, the short ones padded
            passes = self.sync.max_int(len(micro)) if self.sync.lockstep else len(micro)
            for n in range(passes):
                if n >= len(micro):
                    self._pad_step(rollout, steps)
                    continue
                finite = self._micro_step(rollout, rows, micro[n], steps, advantages, scale, stats, first) and finite
                if not finite and not self.sync.lockstep:
                    break
            finite = self.sync.all_true(finite)
            if finite:
                self.sync.reduce_grads()
            grad_norm = self._grad_norm() if finite else float("nan")
            if not finite or not math.isfinite(grad_norm):
                if finite:
                    log.warning("non-finite gradient norm (%s): this optimizer step is skipped", grad_norm)
                self.optimizer.zero_grad(set_to_none=True)
                stats.skipped += 1
                first = False
                continue
            stats.grad_norms.append(grad_norm)
            self.optimizer.step()
            stats.optimizer_steps += 1
            if self.ema is not None:
                self.ema.update()
            first = False
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        stats.reduce(self.sync)
        self.check_ratio(stats)
        return stats

    def check_ratio(self, stats: UpdateStats) -> None:
        if not stats.first_pairs:
            return
        ratio = stats.first_ratio / stats.first_pairs
        if abs(ratio - 1) > self.ratio_tolerance:
            msg = (f"RATIO CHECK FAILED: mean importance ratio at the first update after the rollout is "
                   f"{ratio:.6g}, expected 1 within {self.ratio_tolerance:g}: {RATIO_CAUSES}")
            log.warning(msg)
            warnings.warn(msg, RatioCheckWarning, stacklevel=3)
