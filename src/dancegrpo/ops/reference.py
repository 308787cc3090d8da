"""The PyTorch reference of every op: the spec in code, readable and float64-capable.

Every backend is tested against these functions. They favour clarity over speed (they build
several full-size temporaries); the ``"torch"`` backend runs them as they are.
Inputs are computed in fp32, or in fp64 when any input is fp64.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
STD_MODES = ("group", "global", "none")
AGGREGATES = ("advantage", "reward")
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).reshape(t.shape[0], -1)


def step_logprob_ref(v, x, y, a, b, std, *, reduction="mean", v_ref=None):
    """log N(y; a x + b v, std^2), averaged (or summed) over each sample's elements.

    v, x, y: (B, ...) any float dtype. a, b, std: (B,). v_ref: optional (B, ...) frozen
    reference output. Returns ``(logp, msd)``: logp (B,) and msd = mean((v - v_ref)^2) (B,)
    (None without v_ref), in the compute dtype.
    """
    dt = compute_dtype(v, x, y, a, b, std, v_ref)
    v2, x2, y2 = (_per_sample(t, dt) for t in (v, x, y))
    a2, b2, s2 = (t.to(dt)[:, None] for t in (a, b, std))
    mean = a2 * x2 + b2 * v2
    elem = -((y2 - mean) ** 2) / (2 * s2 * s2) - torch.log(s2) - LOG_SQRT_2PI
    logp = elem.sum(1) if reduction == "sum" else elem.mean(1)
    msd = None
    if v_ref is not None:
        msd = ((v2 - _per_sample(v_ref, dt)) ** 2).mean(1)
    return logp, msd


def sample_step_ref(v, x, noise, a, b, std, *, reduction="mean"):
    """y = a x + b v + std * noise, stored in x's dtype; logp is the log-prob of that stored y."""
    dt = compute_dtype(v, x, noise, a, b, std)
    shape = (-1,) + (1,) * (x.dim() - 1)
    mean = a.to(dt).view(shape) * x.to(dt) + b.to(dt).view(shape) * v.to(dt)
    y = (mean + std.to(dt).view(shape) * noise.to(dt)).to(x.dtype)
    logp, _ = step_logprob_ref(v, x, y, a, b, std, reduction=reduction)
    return y, logp


def group_advantages_ref(rewards, weights, group_size, *, std="group", unbiased=True, eps=1e-8,
                         clip=5.0, aggregate="advantage", drop_nonfinite=False):
    """Group-normalised advantages (SPEC section 3).

    rewards (B, K), groups contiguous; weights (K,). A sample with a non-finite reward is
    dropped when ``drop_nonfinite`` (advantage 0, excluded from its group's statistics). A group
    whose valid rewards are all equal gets advantage exactly 0.
    """
    dt = compute_dtype(rewards)
    r = rewards.to(dt)
    B, K = r.shape
    P, G = B // group_size, group_size
    w = weights.to(dt)
    valid = torch.isfinite(r).all(1) if drop_nonfinite else torch.ones(B, dtype=torch.bool, device=r.device)
    r = torch.where(valid[:, None], r, torch.zeros((), dtype=dt, device=r.device))
    if aggregate == "reward":
        r = (r * w).sum(1, keepdim=True)
        w = torch.ones(1, dtype=dt, device=r.device)
    rg = r.view(P, G, -1)
    m = valid.view(P, G, 1).to(dt)
    n = m.sum(1, keepdim=True)  # valid members per group
    mean = (rg * m).sum(1, keepdim=True) / n.clamp(min=1)
    centred = (rg - mean) * m
    # A group whose valid rewards are all equal: exactly 0 (the mean is not exact in floats).
    big = torch.finfo(dt).max
    hi = torch.where(m > 0, rg, torch.full_like(rg, -big)).amax(1, keepdim=True)
    lo = torch.where(m > 0, rg, torch.full_like(rg, big)).amin(1, keepdim=True)
    centred = torch.where(hi > lo, centred, torch.zeros_like(centred))
    if std == "group":
        dof = (n - 1) if unbiased else n
        var = (centred ** 2).sum(1, keepdim=True) / dof.clamp(min=1)
        adv = centred / (var.sqrt() + eps)
    elif std == "global":
        vm = valid.to(dt)[:, None]
        nb = vm.sum()
        gmean = (r * vm).sum(0) / nb.clamp(min=1)
        dof = (nb - 1) if unbiased else nb
        gvar = (((r - gmean) * vm) ** 2).sum(0) / dof.clamp(min=1)
        adv = centred / (gvar.sqrt() + eps)
    else:
        adv = centred
    adv = (adv.reshape(B, -1) * w).sum(1)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return torch.where(valid, adv, torch.zeros_like(adv)).to(torch.float32 if dt != torch.float64 else dt)


def clipped_ratio_loss_ref(logp, old_logp, advantages, *, clip_low=1e-4, clip_high=1e-4,
                           ref_logp=None, beta=0.0, reduction="mean"):
    """PPO-style clipped surrogate (SPEC section 4) plus beta * k3 KL to ``ref_logp``.

    Gradient flows to ``logp`` only (old_logp, advantages, ref_logp are constants).
    Returns ``(loss, stats)`` with stats = [clip_fraction, approx_kl, ratio_mean] (3,), detached.
    """
    dt = compute_dtype(logp, old_logp, advantages, ref_logp)
    lp = logp.to(dt)
    old = old_logp.detach().to(dt)
    adv = advantages.detach().to(dt)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per = torch.maximum(unclipped, clipped)
    if ref_logp is not None and beta != 0.0:
        d = ref_logp.detach().to(dt) - lp
        per = per + beta * (torch.exp(d) - d - 1)
    loss = per.mean() if reduction == "mean" else per.sum() if reduction == "sum" else per
    with torch.no_grad():
        clipped_mask = (ratio < 1 - clip_low) | (ratio > 1 + clip_high)
        stats = torch.stack([clipped_mask.to(dt).mean(), 0.5 * (log_ratio ** 2).mean(), ratio.mean()])
    return loss, stats.to(torch.float32 if dt != torch.float64 else dt)
