"""``clipped_ratio_loss``: the PPO/GRPO clipped surrogate plus k3 KL, forward and backward.

Math, per sample (docs/math.md), with lo = 1 - clip_low, hi = 1 + clip_high:

    ratio = exp(logp - old);  u = -A ratio;  c = -A clamp(ratio, lo, hi)
    per   = max(u, c) + beta (exp(ref - logp) - (ref - logp) - 1)      (KL term only with ref, beta != 0)
    loss  = mean(per) | sum(per) | per;   stats = [mean(ratio < lo or ratio > hi),
                                                    0.5 mean((logp - old)^2), mean(ratio)]

Gradient to logp only, with PyTorch's tie rules so the kernel matches autograd of the
reference everywhere: max(u, c) sends the gradient to the larger side and half to each on a tie
(u == c, the usual case while the ratio is inside the clip range); clamp passes it only where
lo <= ratio <= hi. Hence d per / d logp = -A ratio (w_u + w_c [lo <= ratio <= hi])
+ beta (1 - exp(ref - logp)): -A ratio except when (ratio > hi and A > 0) or (ratio < lo and
A < 0), where it is 0.

Shape. These are (B,) vectors with B in the tens to thousands: launch-bound work, so each
direction is one single-program launch that loops over the batch in blocks (any B works) and
reduces the loss and the three statistics in the same pass. Clip ranges and beta are runtime
floats; the bounds 1 - clip_low, 1 + clip_high are formed in float64 on the host and rounded to
fp32 once, as PyTorch does with a Python scalar bound on an fp32 tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import BATCH_BLOCK, BATCH_WARPS, cast_to


@triton.jit
def _surrogate(lp, old, adv, lo, hi):
    log_ratio = lp - old
    ratio = tl.exp(log_ratio)
    u = -adv * ratio
    c = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    return log_ratio, ratio, u, c


@triton.jit
def _policy_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, ref_ptr, loss_ptr, stats_ptr, B, lo, hi, beta,
                            HAS_REF: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK], dtype=tl.float32)
    acc_lr2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, B, BLOCK):
        i = s0 + lanes
        m = i < B
        lp = tl.load(logp_ptr + i, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + i, mask=m, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + i, mask=m, other=0.0).to(tl.float32)
        log_ratio, ratio, u, c = _surrogate(lp, old, adv, lo, hi)
        per = tl.maximum(u, c)
        if HAS_REF:
            d = tl.load(ref_ptr + i, mask=m, other=0.0).to(tl.float32) - lp
            per += tl.where(beta != 0.0, beta * (tl.exp(d) - d - 1.0), 0.0)
        if REDUCTION == 2:
            tl.store(loss_ptr + i, per, mask=m)
        acc_loss += tl.where(m, per, 0.0)
        acc_clip += tl.where(m & ((ratio < lo) | (ratio > hi)), 1.0, 0.0)
        acc_lr2 += tl.where(m, log_ratio * log_ratio, 0.0)
        acc_ratio += tl.where(m, ratio, 0.0)
    if REDUCTION == 0:
        tl.store(loss_ptr, tl.sum(acc_loss, axis=0) / B)
    elif REDUCTION == 1:
        tl.store(loss_ptr, tl.sum(acc_loss, axis=0))
    tl.store(stats_ptr + 0, tl.sum(acc_clip, axis=0) / B)
    tl.store(stats_ptr + 1, 0.5 * tl.sum(acc_lr2, axis=0) / B)
    tl.store(stats_ptr + 2, tl.sum(acc_ratio, axis=0) / B)


@triton.jit
def _policy_loss_bwd_kernel(g_ptr, logp_ptr, old_ptr, adv_ptr, ref_ptr, out_ptr, B, lo, hi, beta,
                            HAS_REF: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    if REDUCTION == 0:
        g_all = tl.load(g_ptr).to(tl.float32) / B
    elif REDUCTION == 1:
        g_all = tl.load(g_ptr).to(tl.float32)
    for s0 in range(0, B, BLOCK):
        i = s0 + lanes
        m = i < B
        lp = tl.load(logp_ptr + i, mask=m, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + i, mask=m, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + i, mask=m, other=0.0).to(tl.float32)
        _, ratio, u, c = _surrogate(lp, old, adv, lo, hi)
        tie = u == c
        w_u = tl.where(tie, 0.5, tl.where(u > c, 1.0, 0.0))
        w_c = tl.where(tie, 0.5, tl.where(c > u, 1.0, 0.0))
        inside = (ratio >= lo) & (ratio <= hi)
        grad = -adv * (w_u + tl.where(inside, w_c, 0.0)) * ratio
        if HAS_REF:
            d = tl.load(ref_ptr + i, mask=m, other=0.0).to(tl.float32) - lp
            grad += tl.where(beta != 0.0, beta * (1.0 - tl.exp(d)), 0.0)
        if REDUCTION == 2:
            g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
        else:
            g = g_all
        tl.store(out_ptr + i, cast_to(g * grad, out_ptr.dtype.element_ty), mask=m)


def _prepare(logp, old_logp, adv, ref_logp, clip_low, clip_high, reduction):
    if logp.dim() != 1 or logp.shape[0] == 0:
        raise ValueError(f"logp must have shape (B,) with B >= 1, got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("adv", adv), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"reduction must be 0 (mean), 1 (sum) or 2 (none), got {reduction}")
    contiguous = [t.contiguous() for t in (logp, old_logp, adv)]
    ref = ref_logp.contiguous() if ref_logp is not None else contiguous[0]
    # Bounds in float64 on the host, rounded to fp32 once at launch (see the module docstring).
    return contiguous, ref, 1.0 - float(clip_low), 1.0 + float(clip_high)


def policy_loss_fwd(logp, old_logp, adv, ref_logp, clip_low: float, clip_high: float, beta: float,
                    reduction: int):
    """Clipped surrogate loss and its statistics, one launch.

    logp, old_logp, adv, ref_logp (optional): (B,) float. reduction: 0 mean, 1 sum, 2 none.
    Returns ``(loss, stats)``: loss fp32 () or (B,); stats fp32 (3,) =
    [clip_fraction, approx_kl, ratio_mean].

    Equivalent PyTorch::

        ratio = (logp - old_logp).exp()
        per = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
        per = per + beta * ((ref_logp - logp).exp() - (ref_logp - logp) - 1)
        loss = per.mean()
    """
    (lp, old, adv), ref, lo, hi = _prepare(logp, old_logp, adv, ref_logp, clip_low, clip_high, reduction)
    batch = lp.shape[0]
    loss = torch.empty(batch if reduction == 2 else (), dtype=torch.float32, device=lp.device)
    stats = torch.empty(3, dtype=torch.float32, device=lp.device)
    _policy_loss_fwd_kernel[(1,)](
        lp, old, adv, ref, loss, stats, batch, lo, hi, float(beta),
        HAS_REF=ref_logp is not None, REDUCTION=int(reduction), BLOCK=BATCH_BLOCK, num_warps=BATCH_WARPS)
    return loss, stats


def policy_loss_bwd(g_loss, logp, old_logp, adv, ref_logp, clip_low: float, clip_high: float, beta: float,
                    reduction: int):
    """Gradient of ``policy_loss_fwd``'s loss with respect to logp, in logp's dtype, one launch.

    g_loss: () for reductions 0/1, (B,) for 2. Returns (B,).
    """
    (lp, old, adv), ref, lo, hi = _prepare(logp, old_logp, adv, ref_logp, clip_low, clip_high, reduction)
    batch = lp.shape[0]
    expected = (batch,) if reduction == 2 else ()
    if g_loss.shape != expected:
        raise ValueError(f"g_loss must have shape {expected}, got {tuple(g_loss.shape)}")
    out = torch.empty_like(lp)
    _policy_loss_bwd_kernel[(1,)](
        g_loss.contiguous(), lp, old, adv, ref, out, batch, lo, hi, float(beta),
        HAS_REF=ref_logp is not None, REDUCTION=int(reduction), BLOCK=BATCH_BLOCK, num_warps=BATCH_WARPS)
    return out
