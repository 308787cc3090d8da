"""``group_advantages``: group-normalised advantages (docs/math.md) in one launch.

Math. Rewards r (B, K), B = P groups of G contiguous samples, weights w (K,). A sample is
valid unless ``drop`` is set and one of its rewards is non-finite; invalid samples count as
reward 0, are left out of every statistic and get advantage 0. For each column k (or, with
``aggregate="reward"``, for the single column sum_k w_k r_k with weight 1):

    n_p   = valid members of group p,  mean_p = sum(r) / max(n_p, 1)
    c     = r - mean_p for valid members of groups whose valid rewards are not all equal, else 0
    A_k   = c / (sqrt(var) + eps) with var = sum_p(c^2) / max(n_p - unbiased, 1)     ("group")
          = c / (sqrt(gvar) + eps), gvar the batch variance of the valid rewards      ("global")
          = c                                                                          ("none")
    A     = clamp(sum_k w_k A_k, -clip, clip)  (no clamp when clip < 0), 0 for invalid samples.

Shape. B is small (a few hundred at most in practice; any B works, it is looped), so the op is
launch-bound: the point is one launch instead of a dozen small PyTorch ops. A single program
walks the batch as tiles of [BLOCK_P groups x BLOCK_G members]; a group larger than BLOCK_G is
walked in member chunks (three passes per chunk of groups: sums and range, centred squares,
write), so any group size works without a huge register tile. The weighted sum over columns
is accumulated in the output buffer; a barrier separates the passes that write and re-read it.
The modes (std, aggregate, drop, unbiased) are structural constexprs; eps and clip are runtime.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import INTERPRET


@triton.jit
def _reward_column(r_ptr, w_ptr, rows, in_range, K, k, AGG: tl.constexpr, DROP: tl.constexpr):
    """Column k of the rewards at ``rows`` (the weighted sum when AGG), 0 where invalid, and validity."""
    base = rows.to(tl.int64) * K
    valid = in_range
    if DROP:
        for j in range(0, K):
            rj = tl.load(r_ptr + base + j, mask=in_range, other=0.0).to(tl.float32)
            valid = valid & (tl.abs(rj) < float("inf"))  # False for +-inf and NaN
    if AGG:
        val = tl.zeros(rows.shape, dtype=tl.float32)
        for j in range(0, K):
            val += tl.load(w_ptr + j).to(tl.float32) * tl.load(r_ptr + base + j, mask=valid, other=0.0).to(tl.float32)
    else:
        val = tl.load(r_ptr + base + k, mask=valid, other=0.0).to(tl.float32)
    return val, valid


@triton.jit
def _group_advantages_fwd_kernel(r_ptr, w_ptr, out_ptr, B, K, G, eps, clip,
                                 STD_MODE: tl.constexpr, UNBIASED: tl.constexpr, AGG: tl.constexpr,
                                 DROP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr):
    P = B // G
    p_lane = tl.arange(0, BLOCK_P)[:, None]
    g_lane = tl.arange(0, BLOCK_G)[None, :]
    flat = tl.arange(0, BLOCK_P * BLOCK_G)
    if AGG:
        ncol = 1
    else:
        ncol = K
    for k in range(0, ncol):
        if AGG:
            wk = 1.0
        else:
            wk = tl.load(w_ptr + k).to(tl.float32)
        if STD_MODE == 1:
            # Batch-wide std of the valid rewards (two passes: mean, then centred squares).
            cnt = tl.zeros([BLOCK_P * BLOCK_G], dtype=tl.float32)
            tot = tl.zeros([BLOCK_P * BLOCK_G], dtype=tl.float32)
            for r0 in range(0, B, BLOCK_P * BLOCK_G):
                rows = r0 + flat
                val, valid = _reward_column(r_ptr, w_ptr, rows, rows < B, K, k, AGG, DROP)
                cnt += valid.to(tl.float32)
                tot += val
            nb = tl.sum(cnt, axis=0)
            gmean = tl.sum(tot, axis=0) / tl.maximum(nb, 1.0)
            sq = tl.zeros([BLOCK_P * BLOCK_G], dtype=tl.float32)
            for r0 in range(0, B, BLOCK_P * BLOCK_G):
                rows = r0 + flat
                val, valid = _reward_column(r_ptr, w_ptr, rows, rows < B, K, k, AGG, DROP)
                d = tl.where(valid, val - gmean, 0.0)
                sq += d * d
            if UNBIASED:
                gdof = nb - 1.0
            else:
                gdof = nb
            gden = tl.sqrt(tl.sum(sq, axis=0) / tl.maximum(gdof, 1.0)) + eps
        for p0 in range(0, P, BLOCK_P):
            grp = p0 + p_lane
            # Pass 1: valid count, sum, max and min of each group.
            n = tl.zeros([BLOCK_P], dtype=tl.float32)
            s = tl.zeros([BLOCK_P], dtype=tl.float32)
            hi = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
            lo = tl.full([BLOCK_P], float("inf"), dtype=tl.float32)
            for g0 in range(0, G, BLOCK_G):
                mem = g0 + g_lane
                rows = grp * G + mem
                val, valid = _reward_column(r_ptr, w_ptr, rows, (grp < P) & (mem < G), K, k, AGG, DROP)
                n += tl.sum(valid.to(tl.float32), axis=1)
                s += tl.sum(val, axis=1)
                hi = tl.maximum(hi, tl.max(tl.where(valid, val, float("-inf")), axis=1))
                lo = tl.minimum(lo, tl.min(tl.where(valid, val, float("inf")), axis=1))
            mean = (s / tl.maximum(n, 1.0))[:, None]
            spread = (hi > lo)[:, None]  # all-equal groups get exactly 0, never 0/0
            # Pass 2 (group std only): sum of centred squares.
            if STD_MODE == 0:
                sq = tl.zeros([BLOCK_P], dtype=tl.float32)
                for g0 in range(0, G, BLOCK_G):
                    mem = g0 + g_lane
                    rows = grp * G + mem
                    val, valid = _reward_column(r_ptr, w_ptr, rows, (grp < P) & (mem < G), K, k, AGG, DROP)
                    c = tl.where(valid & spread, val - mean, 0.0)
                    sq += tl.sum(c * c, axis=1)
                if UNBIASED:
                    dof = n - 1.0
                else:
                    dof = n
                den = (tl.sqrt(sq / tl.maximum(dof, 1.0)) + eps)[:, None]
            elif STD_MODE == 1:
                den = gden
            else:
                den = 1.0
            # Pass 3: accumulate w_k A_k into the output (read back for k > 0).
            for g0 in range(0, G, BLOCK_G):
                mem = g0 + g_lane
                rows = grp * G + mem
                in_range = (grp < P) & (mem < G)
                val, valid = _reward_column(r_ptr, w_ptr, rows, in_range, K, k, AGG, DROP)
                adv = tl.where(valid & spread, val - mean, 0.0) / den
                prev = tl.load(out_ptr + rows, mask=in_range & (k > 0), other=0.0)
                tl.store(out_ptr + rows, prev + adv * wk, mask=in_range)
        tl.debug_barrier()  # the next column (and the final pass) re-read what other threads wrote
    # Final pass: clip, and exactly 0 for dropped samples.
    for r0 in range(0, B, BLOCK_P * BLOCK_G):
        rows = r0 + flat
        in_range = rows < B
        _, valid = _reward_column(r_ptr, w_ptr, rows, in_range, K, 0, False, DROP)
        adv = tl.load(out_ptr + rows, mask=in_range, other=0.0)
        adv = tl.where(clip >= 0.0, tl.minimum(tl.maximum(adv, -clip), clip), adv)
        tl.store(out_ptr + rows, tl.where(valid, adv, 0.0), mask=in_range)


def group_advantages_fwd(rewards, weights, group_size: int, std_mode: int, unbiased: bool, eps: float,
                         clip: float, aggregate_reward: bool, drop_nonfinite: bool):
    """Group-normalised advantages, one launch.

    rewards: (B, K) float, groups of ``group_size`` contiguous rows; weights: (K,).
    std_mode: 0 group, 1 global, 2 none; clip < 0: no clipping. Returns fp32 (B,).

    Equivalent PyTorch (K = 1, std_mode 0, no drops)::

        r = rewards.view(-1, group_size)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).clamp(-clip, clip).flatten()
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (B, K), got {tuple(rewards.shape)}")
    batch, k = rewards.shape
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
    if group_size < 1 or batch % group_size:
        raise ValueError(f"group_size must be a positive divisor of B={batch}, got {group_size}")
    if std_mode not in (0, 1, 2):
        raise ValueError(f"std_mode must be 0 (group), 1 (global) or 2 (none), got {std_mode}")
    out = torch.empty(batch, dtype=torch.float32, device=rewards.device)
    cap_g, tile = (8, 16) if INTERPRET else (1024, 2048)
    block_g = min(triton.next_power_of_2(group_size), cap_g)
    _group_advantages_fwd_kernel[(1,)](
        rewards.contiguous(), weights.contiguous(), out, batch, k, group_size, float(eps), float(clip),
        STD_MODE=int(std_mode), UNBIASED=bool(unbiased), AGG=bool(aggregate_reward), DROP=bool(drop_nonfinite),
        BLOCK_P=max(1, tile // block_g), BLOCK_G=block_g, num_warps=1 if INTERPRET else 4)
    return out
