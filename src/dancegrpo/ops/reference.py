"""The PyTorch reference of every op: the math of docs/math.md in code, readable and float64-capable.

Every backend is tested against these functions. They favour clarity over speed (they build
several full-size temporaries); the ``"torch"`` backend runs them as they are.
Inputs are computed in fp32, or in fp64 when any input is fp64.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
STD_MODES = ("group", "global", "none")
# What a step's "log-probability" is (docs/math.md, "Log-prob conventions"): the exact Gaussian
# log-density, or Flow-GRPO's CPS surrogate -(y - mean)^2 (no 1/(2 std^2), no normalising terms).
LOGPROBS = ("gaussian", "mse")
AGGREGATES = ("advantage", "reward")
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).reshape(t.shape[0], -1)


def step_logprob_ref(v, x, y, a, b, std, *, reduction="mean", v_ref=None, logprob="gaussian"):
    """log N(y; a x + b v, std^2), averaged (or summed) over each sample's elements.

    v, x, y: (B, ...) any float dtype. a, b, std: (B,). v_ref: optional (B, ...) frozen
    reference output. ``logprob="mse"`` replaces the Gaussian log-density of each element by
    Flow-GRPO's CPS surrogate ``-(y - mean)^2``. Returns ``(logp, msd)``: logp (B,) and
    msd = mean((v - v_ref)^2) (B,) (None without v_ref), in the compute dtype.
    """
    dt = compute_dtype(v, x, y, a, b, std, v_ref)
    v2, x2, y2 = (_per_sample(t, dt) for t in (v, x, y))
    a2, b2, s2 = (t.to(dt)[:, None] for t in (a, b, std))
    mean = a2 * x2 + b2 * v2
    if logprob == "mse":
        elem = -((y2 - mean) ** 2)
    else:
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
    """Group-normalised advantages with contiguous groups of ``group_size`` (docs/math.md,
    "Advantages"): :func:`group_advantages_by_ids_ref` with ids ``0 0 .. 0 1 1 .. 1 ...``."""
    ids = torch.arange(rewards.shape[0], device=rewards.device) // group_size
    return group_advantages_by_ids_ref(rewards, weights, ids, std=std, unbiased=unbiased, eps=eps, clip=clip,
                                       aggregate=aggregate, drop_nonfinite=drop_nonfinite)


def dense_group_ids(group_ids: torch.Tensor) -> torch.Tensor:
    """Any integer ids (B,) -> ids in [0, number of groups), equal where the input is equal.

    Sort-based, so shapes never depend on the values (it traces under ``torch.compile``)."""
    order = torch.argsort(group_ids, stable=True)
    ranked = group_ids[order]
    starts = torch.ones_like(ranked, dtype=torch.bool)
    starts[1:] = ranked[1:] != ranked[:-1]
    dense_ranked = torch.cumsum(starts.long(), 0) - 1
    return torch.empty_like(dense_ranked).scatter_(0, order, dense_ranked)


def group_advantages_by_ids_ref(rewards, weights, group_ids, *, std="group", unbiased=True, eps=1e-8,
                                clip=5.0, aggregate="advantage", drop_nonfinite=False):
    """Group-normalised advantages, sample ``i`` belonging to group ``group_ids[i]``.

    rewards (B, K); weights (K,); group_ids (B,) int64 in [0, B) (see :func:`dense_group_ids`),
    groups in any order and of any sizes. Per group and reward column k:
    ``A_k = (r_k - mean) / (std + eps)`` (std per ``std``: the group's, the batch's, or 1 with
    ``"none"`` and no eps); then ``A = clip(sum_k w_k A_k)``. With ``aggregate="reward"`` the
    weighted sum ``sum_k w_k r_k`` is normalised instead. A sample with a non-finite reward is
    dropped when ``drop_nonfinite`` (advantage 0, excluded from its group's statistics). A group
    whose valid rewards are all equal gets exactly 0, so does a group of one valid sample (it is
    its own mean; its unbiased std 0/0 is never formed).

    Group statistics are sums over members, ``index_add`` into one slot per group id (on CUDA
    these sums use atomics, so their last bits may vary between runs unless
    ``torch.use_deterministic_algorithms(True)``).
    """
    dt = compute_dtype(rewards)
    r = rewards.to(dt)
    B = r.shape[0]
    ids = group_ids.to(device=r.device, dtype=torch.long)
    w = weights.to(dt)
    zero = torch.zeros((), dtype=dt, device=r.device)
    valid = torch.isfinite(r).all(1) if drop_nonfinite else torch.ones(B, dtype=torch.bool, device=r.device)
    r = torch.where(valid[:, None], r, zero)
    if aggregate == "reward":
        r = (r * w).sum(1, keepdim=True)
        w = torch.ones(1, dtype=dt, device=r.device)
    m = valid.to(dt)[:, None]  # (B, 1): 1 for a sample that counts in its group's statistics

    def group_sum(t):  # (B, C) per sample -> (B, C): the sum over the sample's group
        return torch.zeros_like(t).index_add_(0, ids, t)[ids]

    def group_extreme(t, reduce, fill):  # max or min over the valid members of the sample's group
        src = torch.where(m > 0, t, torch.full_like(t, fill))
        slots = torch.full_like(t, fill).scatter_reduce_(0, ids[:, None].expand_as(t), src, reduce)
        return slots[ids]

    n = group_sum(m)  # valid members of each sample's group
    mean = group_sum(r * m) / n.clamp(min=1)
    centred = (r - mean) * m
    # A group whose valid rewards are all equal: exactly 0 (the mean is not exact in floats).
    big = torch.finfo(dt).max
    centred = torch.where(group_extreme(r, "amax", -big) > group_extreme(r, "amin", big), centred, zero)
    if std == "group":
        dof = (n - 1) if unbiased else n
        var = group_sum(centred ** 2) / dof.clamp(min=1)
        adv = centred / (var.sqrt() + eps)
    elif std == "global":
        nb = m.sum()
        gmean = (r * m).sum(0) / nb.clamp(min=1)
        dof = (nb - 1) if unbiased else nb
        gvar = (((r - gmean) * m) ** 2).sum(0) / dof.clamp(min=1)
        adv = centred / (gvar.sqrt() + eps)
    else:
        adv = centred
    adv = (adv * w).sum(1)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return torch.where(valid, adv, torch.zeros_like(adv)).to(torch.float32 if dt != torch.float64 else dt)


def clipped_ratio_loss_ref(logp, old_logp, advantages, *, clip_low=1e-4, clip_high=1e-4,
                           ref_logp=None, beta=0.0, reduction="mean"):
    """PPO-style clipped surrogate (docs/math.md, "The loss") plus beta * k3 KL to ``ref_logp``.

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


def grpo_step_loss_ref(v, x, y, a, b, std, old_logp, advantages, *, clip_low=1e-4, clip_high=1e-4, v_ref=None,
                       beta=0.0, logprob="gaussian", ratio_norm=False, v_old=None):
    """The per-timestep GRPO loss, written out: what ``grpo_step_loss`` computes.

    v (B, ...) model output (differentiable); x, y (B, ...) latents and stored next latents;
    a, b, std (B,) the step; old_logp, advantages (B,) from the rollout; v_ref (B, ...) the
    frozen reference model's output. In the compute dtype (fp64 if any input is):

        logp   = mean over elements of log N(y; a x + b v, std^2)   (or -(y - mean)^2, "mse")
        ratio  = exp(logp - old_logp)
        loss   = mean(max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high)))
        KL     = mean over elements of (b (v - v_ref))^2 / (2 std^2)
               = KL(N(mean_theta, std^2) || N(mean_ref, std^2)) per element, the exact Gaussian KL
                 of the step (whatever ``logprob`` is: it is a divergence between the two steps)
        loss  += beta * mean(KL)

    ``ratio_norm`` (GRPO-Guard, Gaussian log-prob; v_old is the rollout's output): the ratio is
    exp(std (logp - old_logp) + mean((mean_theta - mean_old)^2) / (2 std)), which for
    y = mean_old + std eps equals exp(mean(eps (mean_theta - mean_old))): no shift below 1 and
    the same spread at every noise level.

    Returns ``(loss, stats)``: stats holds detached clip_fraction, approx_kl
    (0.5 mean (logp - old)^2), ratio_mean, kl (mean KL, with v_ref) and logp (B,).
    """
    logp, _ = step_logprob_ref(v, x, y, a, b, std, logprob=logprob)
    if ratio_norm:
        dt = logp.dtype
        gap = b.to(dt)[:, None] * (_per_sample(v, dt) - _per_sample(v_old.detach(), dt))  # mean_theta - mean_old
        s = std.to(dt)
        log_ratio = s * (logp - old_logp.detach().to(dt)) + (gap ** 2).mean(1) / (2 * s)
        loss, raw = clipped_ratio_loss_ref(log_ratio, torch.zeros_like(log_ratio), advantages, clip_low=clip_low,
                                           clip_high=clip_high)
    else:
        loss, raw = clipped_ratio_loss_ref(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high)
    stats = {"clip_fraction": raw[0], "approx_kl": raw[1], "ratio_mean": raw[2]}
    if v_ref is not None:
        dt = logp.dtype
        mean_gap = b.to(dt)[:, None] * (_per_sample(v, dt) - _per_sample(v_ref.detach(), dt))  # mean_theta - mean_ref
        kl = (mean_gap ** 2).mean(1) / (2 * std.to(dt) ** 2)
        stats["kl"] = kl.detach().mean()
        loss = loss + beta * kl.mean()
    stats["logp"] = logp.detach()
    return loss, stats


NFT_WEIGHTINGS = ("adaptive", "none")


def nft_loss_ref(v, v_old, target, r, t, *, beta=1.0, weighting="adaptive", eps=1e-5):
    """DiffusionNFT's per-sample loss on a forward-noised sample (docs/algorithms_nft.md).

    v (B, ...) the trained model's velocity (differentiable); v_old (B, ...) the frozen old
    policy's velocity on the same x_t; target (B, ...) the flow-matching velocity eps - x0;
    r (B,) optimality probabilities in [0, 1]; t (B,) the noise level of x_t = (1 - t) x0 + t eps.

        v_pos = (1 - beta) v_old + beta v          (implicit positive policy)
        v_neg = (1 + beta) v_old - beta v          (implicit negative policy)
        e_pos = s (v_pos - target), e_neg = s (v_neg - target)
        L_pos = mean(e_pos^2) / w_pos,  L_neg = mean(e_neg^2) / w_neg
        per   = (r L_pos + (1 - r) L_neg) / beta

    ``weighting="adaptive"``: s = t, so e is the x0-prediction error (x_t - t v) - x0, and
    w = max(mean|e|, eps), detached (the reference implementation's adaptive weight);
    ``"none"``: s = 1, w = 1 (the plain velocity MSE of the paper's objective).
    Returns ``(per (B,), parts (B, 5))``, parts = [L_pos, L_neg, w_pos, w_neg, mean((v - v_old)^2)]
    detached, in the compute dtype.
    """
    dt = compute_dtype(v, v_old, target, r, t)
    v2, o2, g2 = (_per_sample(x, dt) for x in (v, v_old.detach(), target.detach()))
    r2, t2 = r.detach().to(dt), t.detach().to(dt)
    scale = t2[:, None] if weighting == "adaptive" else torch.ones_like(t2)[:, None]

    def term(pred):
        err = scale * (pred - g2)
        if weighting == "adaptive":
            w = err.detach().abs().mean(1).clamp(min=eps)
        else:
            w = torch.ones_like(t2)
        return (err ** 2).mean(1) / w, w

    l_pos, w_pos = term((1 - beta) * o2 + beta * v2)
    l_neg, w_neg = term((1 + beta) * o2 - beta * v2)
    per = (r2 * l_pos + (1 - r2) * l_neg) / beta
    with torch.no_grad():
        parts = torch.stack([l_pos, l_neg, w_pos, w_neg, ((v2 - o2) ** 2).mean(1)], 1)
    return per, parts
