"""The policy update (steps 4-5 of the loop in loop.py).

For each (sample, chosen step) the model is forwarded with grad and
:func:`dancegrpo.grpo_step_loss` gives the clipped-ratio loss of the stored next latent (plus
the exact Gaussian KL to the reference when ``kl_beta > 0``). Losses are scaled by
``1 / (micro-batches in the accumulation group * trained steps)`` and accumulated; then the
gradient norm is clipped and AdamW steps, and the EMA follows.

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
    losses: list[float] = field(default_factory=list)
    clip_fractions: list[float] = field(default_factory=list)
    approx_kls: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    first_ratios: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    optimizer_steps: int = 0
    skipped: int = 0
    nfe: int = 0  # network evaluations (per sample) of the update: policy and reference forwards

    def summary(self) -> dict:
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")
        out = {
            "loss": mean(self.losses), "clip_fraction": mean(self.clip_fractions),
            "approx_kl": mean(self.approx_kls), "ratio_mean": mean(self.ratios),
            "ratio_first_update": mean(self.first_ratios), "grad_norm": mean(self.grad_norms),
            "optimizer_steps": self.optimizer_steps, "skipped": self.skipped, "nfe": self.nfe,
        }
        if self.kls:
            out["kl"] = mean(self.kls)
        return out


class Updater:
    """Holds what the update needs: the model, its trainable parameters, AdamW, EMA, reference.

    ref_predict: ``(x, t, cond) -> v_ref`` or None (no KL).
    """

    def __init__(self, model, params, optimizer, *, train_batch_size: int, accumulation: int, max_grad_norm: float,
                 clip_range: float, clip_range_high, kl_beta: float, ref_predict=None, ema=None,
                 mixed_precision: str = "no", update_mode: str = "train", ratio_tolerance: float = 1e-3,
                 backend: str = "auto", device="cpu", ratio_norm: bool = False):
        self.model, self.params, self.optimizer = model, list(params), optimizer
        self.train_batch_size, self.accumulation = int(train_batch_size), int(accumulation)
        self.max_grad_norm = float(max_grad_norm)
        self.clip_range, self.clip_range_high, self.kl_beta = clip_range, clip_range_high, float(kl_beta)
        self.ref_predict, self.ema = ref_predict, ema
        self.mixed_precision, self.update_mode = mixed_precision, update_mode
        self.ratio_tolerance, self.backend = float(ratio_tolerance), backend
        self.ratio_norm = bool(ratio_norm)
        self.device = torch.device(device)

    def _grad_norm(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _micro_step(self, rollout: Rollout, samples, steps, advantages, scale, stats, first) -> bool:
        """Forward + backward of one micro-batch over its K chosen steps. False on a non-finite loss."""
        k = steps.shape[1]
        adv = advantages[samples].to(self.device)
        for j in range(k):
            x, y, t, coeffs, old_logp, cond = rollout.step_batch(samples, steps[samples, j], self.device)
            with autocast_context(self.device, self.mixed_precision):
                v = self.model.predict(x, t, cond)
                v_ref = self.ref_predict(x, t, cond) if self.ref_predict is not None else None
            stats.nfe += x.shape[0] * (2 if v_ref is not None else 1)
            v_old = rollout.old_outputs(samples, steps[samples, j], self.device) if self.ratio_norm else None
            loss, st = grpo_step_loss(v, x, y, coeffs, old_logp, adv, clip_range=self.clip_range,
                                      clip_range_high=self.clip_range_high, ref_model_output=v_ref,
                                      beta=self.kl_beta, backend=self.backend, ratio_norm=self.ratio_norm,
                                      old_model_output=v_old)
            value = float(loss.detach())
            if not math.isfinite(value):
                log.warning("non-finite loss (%s) at a micro-batch: this optimizer step is skipped", value)
                return False
            (loss * scale).backward()
            stats.losses.append(value)
            stats.clip_fractions.append(float(st["clip_fraction"]))
            stats.approx_kls.append(float(st["approx_kl"]))
            stats.ratios.append(float(st["ratio_mean"]))
            if "kl" in st:
                stats.kls.append(float(st["kl"]))
            if first:
                stats.first_ratios.append(float(st["ratio_mean"]))
        return True

    def run(self, rollout: Rollout, advantages: torch.Tensor, steps: torch.Tensor,
            generator: torch.Generator) -> UpdateStats:
        """One pass over the rollout. advantages (B,) fp32; steps (B, K) long from the selector;
        generator (CPU) shuffles the samples into micro-batches."""
        stats = UpdateStats()
        batch, k = steps.shape
        order = torch.randperm(batch, generator=generator)
        micro = [order[i:i + self.train_batch_size] for i in range(0, batch, self.train_batch_size)]
        groups = [micro[i:i + self.accumulation] for i in range(0, len(micro), self.accumulation)]
        self.model.train(self.update_mode == "train")
        first = True
        for group in groups:
            self.optimizer.zero_grad(set_to_none=True)
            scale = 1.0 / (len(group) * k)
            finite = all(self._micro_step(rollout, mb, steps, advantages, scale, stats, first) for mb in group)
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
        self.check_ratio(stats)
        return stats

    def check_ratio(self, stats: UpdateStats) -> None:
        if not stats.first_ratios:
            return
        ratio = sum(stats.first_ratios) / len(stats.first_ratios)
        if abs(ratio - 1) > self.ratio_tolerance:
            msg = (f"RATIO CHECK FAILED: mean importance ratio at the first update after the rollout is "
                   f"{ratio:.6g}, expected 1 within {self.ratio_tolerance:g}: {RATIO_CAUSES}")
            log.warning(msg)
            warnings.warn(msg, RatioCheckWarning, stacklevel=3)
