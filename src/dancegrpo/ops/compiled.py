"""Shared glue for the compiled backends (``native`` C++/CUDA, ``triton``).

A compiled backend provides torch ops in its own namespace with these schemas (the C++
extension registers them with TORCH_LIBRARY, Triton with ``torch.library.custom_op``), each
with a fake/meta kernel so ``torch.compile`` traces through them:

    logprob_fwd(Tensor v, Tensor x, Tensor y, Tensor? v_ref, Tensor a, Tensor b, Tensor std,
                bool sum) -> (Tensor logp, Tensor msd)
        logp (B,) fp32: mean (sum if ``sum``) over each sample of
            -(y - mean)^2 / (2 std^2) - log std - log sqrt(2 pi),  mean = a x + b v
        msd (B,) fp32 = mean((v - v_ref)^2) per sample; shape (0,) when v_ref is None.
    logprob_bwd(Tensor g_logp, Tensor? g_msd, Tensor v, Tensor x, Tensor y, Tensor? v_ref,
                Tensor a, Tensor b, Tensor std, bool sum, bool need_v, bool need_x,
                bool need_y) -> (Tensor gv, Tensor gx, Tensor gy)
        With r = y - mean and k = 1 / (std^2 N) (1 / std^2 if ``sum``), per sample:
            gv = g_logp b k r + g_msd 2 (v - v_ref) / N;  gx = g_logp a k r;  gy = -g_logp k r
        each in its input's dtype and shape, or shape (0,) when not needed. One pass.
    sample_step(Tensor v, Tensor x, Tensor noise, Tensor a, Tensor b, Tensor std, bool sum)
                -> (Tensor y, Tensor logp)
        y = a x + b v + std noise stored in x.dtype; logp of the *stored* y.
    group_advantages(Tensor rewards, Tensor weights, int group_size, int std_mode,
                bool unbiased, float eps, float clip, bool aggregate_reward,
                bool drop_nonfinite) -> Tensor
        rewards (B, K) fp32, weights (K,) fp32; std_mode 0 group / 1 global / 2 none;
        clip < 0 means no clipping. (B,) fp32.
    policy_loss_fwd(Tensor logp, Tensor old_logp, Tensor adv, Tensor? ref_logp,
                float clip_low, float clip_high, float beta, int reduction)
                -> (Tensor loss, Tensor stats)
        reduction 0 mean / 1 sum / 2 none; loss () or (B,); stats (3,) fp32:
        [clip_fraction, approx_kl, ratio_mean].
    policy_loss_bwd(Tensor g_loss, Tensor logp, Tensor old_logp, Tensor adv, Tensor? ref_logp,
                float clip_low, float clip_high, float beta, int reduction) -> Tensor g_logp
    nft_loss_fwd(Tensor v, Tensor v_old, Tensor target, Tensor r, Tensor t, float beta,
                float eps, bool adaptive) -> (Tensor per, Tensor parts)
        With d+ = (1 - beta) v_old + beta v - target, d- = (1 + beta) v_old - beta v - target,
        s = t (adaptive) or 1: L+- = mean((s d+-)^2) / w+-, w+- = max(mean|s d+-|, eps)
        (adaptive) or 1; per (B,) fp32 = (r L+ + (1 - r) L-) / beta;
        parts (B, 5) fp32 = [L+, L-, w+, w-, mean((v - v_old)^2)]. One pass over the inputs.
    nft_loss_bwd(Tensor g_per, Tensor v, Tensor v_old, Tensor target, Tensor r, Tensor t,
                Tensor parts, float beta, bool adaptive) -> Tensor gv
        gv = g_per 2 s^2 / N (r d+ / w+ - (1 - r) d- / w-) in v's dtype (w from parts, the
        weights held constant as in the reference). One pass.

All per-sample scalars (a, b, std, logp...) are fp32 (B,) tensors. Every op accepts inputs of
any strides (a strided input is copied once inside the op) and returns contiguous outputs, in
its real and its fake/meta kernel alike: inductor enforces a custom op's eager input strides
only in forward graphs and may hand a backward op saved tensors in a layout of its choosing.
Per-step scalars are runtime values, so changing sigma or a clip range never recompiles anything.
"""

from __future__ import annotations

import torch

from .dispatch import Backend
from .reference import REDUCTIONS, STD_MODES


def register_autograd(namespace: str) -> None:
    """Attach backward formulas to ``namespace::logprob_fwd``, ``policy_loss_fwd`` and ``nft_loss_fwd``."""
    ops = getattr(torch.ops, namespace)

    def logprob_setup(ctx, inputs, output):
        v, x, y, v_ref, a, b, std, sum_ = inputs
        ctx.save_for_backward(v, x, y, v_ref, a, b, std)
        ctx.sum = sum_

    def logprob_backward(ctx, g_logp, g_msd):
        v, x, y, v_ref, a, b, std = ctx.saved_tensors
        need_v, need_x, need_y = ctx.needs_input_grad[:3]
        gm = g_msd if v_ref is not None else None
        gv, gx, gy = ops.logprob_bwd(g_logp, gm, v, x, y, v_ref, a, b, std, ctx.sum, need_v, need_x, need_y)
        return (gv if need_v else None, gx if need_x else None, gy if need_y else None,
                None, None, None, None, None)

    torch.library.register_autograd(f"{namespace}::logprob_fwd", logprob_backward, setup_context=logprob_setup)

    def loss_setup(ctx, inputs, output):
        logp, old, adv, ref, lo, hi, beta, red = inputs
        ctx.save_for_backward(logp, old, adv, ref)
        ctx.args = (lo, hi, beta, red)

    def loss_backward(ctx, g_loss, g_stats):
        logp, old, adv, ref = ctx.saved_tensors
        g = ops.policy_loss_bwd(g_loss, logp, old, adv, ref, *ctx.args)
        return g, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::policy_loss_fwd", loss_backward, setup_context=loss_setup)

    def nft_setup(ctx, inputs, output):
        v, v_old, target, r, t, beta, eps, adaptive = inputs
        ctx.save_for_backward(v, v_old, target, r, t, output[1])
        ctx.args = (beta, adaptive)

    def nft_backward(ctx, g_per, g_parts):
        v, v_old, target, r, t, parts = ctx.saved_tensors
        gv = ops.nft_loss_bwd(g_per, v, v_old, target, r, t, parts, *ctx.args) if ctx.needs_input_grad[0] else None
        return gv, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::nft_loss_fwd", nft_backward, setup_context=nft_setup)


class CompiledBackend(Backend):
    """A backend whose ops live in ``torch.ops.<namespace>`` with the schemas above."""

    namespace: str = ""

    def _ops(self):
        return getattr(torch.ops, self.namespace)

    def step_logprob(self, v, x, y, v_ref, a, b, std, reduction):
        logp, msd = self._ops().logprob_fwd(v, x, y, v_ref, a, b, std, reduction == "sum")
        return logp, (msd if v_ref is not None else None)

    def sample_step(self, v, x, noise, generator, a, b, std, reduction):
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return self._ops().sample_step(v, x, noise, a, b, std, reduction == "sum")

    def group_advantages(self, rewards, weights, group_size, std, unbiased, eps, clip, aggregate, drop_nonfinite):
        return self._ops().group_advantages(
            rewards, weights, group_size, STD_MODES.index(std), unbiased, float(eps),
            -1.0 if clip is None else float(clip), aggregate == "reward", drop_nonfinite)

    def clipped_ratio_loss(self, logp, old_logp, adv, ref_logp, clip_low, clip_high, beta, reduction):
        return self._ops().policy_loss_fwd(logp, old_logp, adv, ref_logp, float(clip_low), float(clip_high),
                                           float(beta), REDUCTIONS.index(reduction))

    def nft_loss(self, v, v_old, target, r, t, beta, eps, adaptive):
        return self._ops().nft_loss_fwd(v, v_old, target, r, t, float(beta), float(eps), bool(adaptive))
