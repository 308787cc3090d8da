"""``nft_loss``: DiffusionNFT's loss on forward-noised samples, forward and backward.

Math, per sample of N elements (v trained velocity, o old policy's, g target, s = t when
adaptive else 1):

    d+ = (1 - beta) o + beta v - g;   d- = (1 + beta) o - beta v - g
    w+- = max(mean|s d+-|, eps) (adaptive) or 1;   L+- = mean((s d+-)^2) / w+-
    per = (r L+ + (1 - r) L-) / beta;   parts = [L+, L-, w+, w-, mean((v - o)^2)]
    d per / d v = 2 s^2 / N (r d+ / w+ - (1 - r) d- / w-)

Forward shape: the split reduction of step_logprob.py: a 1-D grid of (sample, tile) programs,
each reading v, o, g once and writing five fp32 partial sums (sum e+^2, sum |e+|, sum e-^2,
sum |e-|, sum (v - o)^2); a per-sample combine kernel adds them in a fixed order in fp64 and
finishes per and parts. Both implicit policies' errors and the old-policy deviation come from
the same loads, so the two MSEs, their adaptive weights and the statistics cost one read of
the inputs. Backward: one elementwise pass, the weights read from parts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import COMBINE_BLOCK, cast_to, fixed_meta, maybe_autotune, reduce_config

_SUMS = 5


@triton.jit
def _errors(v, o, g, cp, cn, beta):
    return (cp * o + beta * v) - g, (cn * o - beta * v) - g


@triton.jit
def _nft_fwd_kernel(v_ptr, o_ptr, g_ptr, t_ptr, part_ptr, N, tiles, jobs, cp, cn, beta,
                    ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // tiles
    tile = pid % tiles
    s = tl.load(t_ptr + sample).to(tl.float32) if ADAPTIVE else 1.0
    base = sample.to(tl.int64) * N
    start = tile.to(tl.int64) * (BLOCK * ITERS)
    lanes = tl.arange(0, BLOCK)
    a0 = tl.zeros([BLOCK], dtype=tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    a3 = tl.zeros([BLOCK], dtype=tl.float32)
    a4 = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        idx = start + it * BLOCK + lanes
        mask = idx < N
        offs = base + idx
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dp, dn = _errors(v, o, g, cp, cn, beta)
        ep = tl.where(mask, s * dp, 0.0)
        en = tl.where(mask, s * dn, 0.0)
        dv = v - o
        a0 += ep * ep
        a1 += tl.abs(ep)
        a2 += en * en
        a3 += tl.abs(en)
        a4 += dv * dv
    tl.store(part_ptr + 0 * jobs + pid, tl.sum(a0, axis=0))
    tl.store(part_ptr + 1 * jobs + pid, tl.sum(a1, axis=0))
    tl.store(part_ptr + 2 * jobs + pid, tl.sum(a2, axis=0))
    tl.store(part_ptr + 3 * jobs + pid, tl.sum(a3, axis=0))
    tl.store(part_ptr + 4 * jobs + pid, tl.sum(a4, axis=0))


@triton.jit
def _row_sum(part_ptr, row, tiles, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for t0 in range(0, tiles, BLOCK):  # fixed order: the result never depends on timing
        t = t0 + lanes
        acc += tl.load(part_ptr + row + t, mask=t < tiles, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0)


@triton.jit(do_not_specialize=["N"])
def _nft_combine_kernel(part_ptr, r_ptr, per_ptr, parts_ptr, N, tiles, jobs, beta, eps,
                        ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    row = sample.to(tl.int64) * tiles
    n = N.to(tl.float64)
    sp2 = _row_sum(part_ptr + 0 * jobs, row, tiles, BLOCK)
    sp1 = _row_sum(part_ptr + 1 * jobs, row, tiles, BLOCK)
    sn2 = _row_sum(part_ptr + 2 * jobs, row, tiles, BLOCK)
    sn1 = _row_sum(part_ptr + 3 * jobs, row, tiles, BLOCK)
    sdv = _row_sum(part_ptr + 4 * jobs, row, tiles, BLOCK)
    if ADAPTIVE:
        wp = tl.maximum(sp1 / n, eps)
        wn = tl.maximum(sn1 / n, eps)
    else:
        wp = tl.full((), 1.0, tl.float64)
        wn = tl.full((), 1.0, tl.float64)
    lp = sp2 / n / wp
    ln = sn2 / n / wn
    r = tl.load(r_ptr + sample).to(tl.float64)
    tl.store(per_ptr + sample, ((r * lp + (1.0 - r) * ln) / beta).to(tl.float32))
    out = parts_ptr + sample.to(tl.int64) * 5
    tl.store(out + 0, lp.to(tl.float32))
    tl.store(out + 1, ln.to(tl.float32))
    tl.store(out + 2, wp.to(tl.float32))
    tl.store(out + 3, wn.to(tl.float32))
    tl.store(out + 4, (sdv / n).to(tl.float32))


@triton.jit
def _nft_bwd_body(gper_ptr, v_ptr, o_ptr, g_ptr, r_ptr, t_ptr, parts_ptr, gv_ptr, N, cp, cn, beta,
                  ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK)
    sample = pid // tiles
    tile = pid % tiles
    s = tl.load(t_ptr + sample).to(tl.float32) if ADAPTIVE else 1.0
    r = tl.load(r_ptr + sample).to(tl.float32)
    c = 2.0 * tl.load(gper_ptr + sample).to(tl.float32) * s * s / N
    kp = c * r / tl.load(parts_ptr + sample.to(tl.int64) * 5 + 2)
    kn = c * (1.0 - r) / tl.load(parts_ptr + sample.to(tl.int64) * 5 + 3)
    idx = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = sample.to(tl.int64) * N + idx
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dp, dn = _errors(v, o, g, cp, cn, beta)
    tl.store(gv_ptr + offs, cast_to(kp * dp - kn * dn, gv_ptr.dtype.element_ty), mask=mask)


_nft_bwd_kernel = maybe_autotune(_nft_bwd_body, key=["N", "ADAPTIVE"])


def _check(v, v_old, target, r, t):
    for name, x in (("v_old", v_old), ("target", target)):
        if x.shape != v.shape or x.device != v.device:
            raise ValueError(f"{name} must have shape {tuple(v.shape)} on {v.device}, got {tuple(x.shape)} on {x.device}")
    batch = v.shape[0]
    for name, x in (("r", r), ("t", t)):
        if x.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(x.shape)}")
    return (x.contiguous() for x in (v, v_old, target, r, t))


def nft_loss_fwd(v, v_old, target, r, t, beta: float, eps: float, adaptive: bool):
    """Per-sample DiffusionNFT loss and its parts (see the module docstring), two launches.

    v, v_old, target: (B, ...) same shape, fp32/bf16/fp16 (dtypes may differ). r, t: (B,) fp32.
    Returns ``(per (B,), parts (B, 5))`` fp32.
    """
    if not (beta > 0 and eps > 0):
        raise ValueError(f"beta and eps must be > 0, got beta={beta}, eps={eps}")
    v, v_old, target, r, t = _check(v, v_old, target, r, t)
    batch = v.shape[0]
    n = v.numel() // batch
    cfg = reduce_config(n)
    tiles = triton.cdiv(n, cfg.tile)
    jobs = batch * tiles
    part = torch.empty(_SUMS * jobs, dtype=torch.float32, device=v.device)
    _nft_fwd_kernel[(jobs,)](v, v_old, target, t, part, n, tiles, jobs, 1.0 - beta, 1.0 + beta, beta,
                             ADAPTIVE=bool(adaptive), BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps)
    per = torch.empty(batch, dtype=torch.float32, device=v.device)
    parts = torch.empty(batch, _SUMS, dtype=torch.float32, device=v.device)
    _nft_combine_kernel[(batch,)](part, r, per, parts, n, tiles, jobs, float(beta), float(eps),
                                  ADAPTIVE=bool(adaptive), BLOCK=COMBINE_BLOCK, num_warps=4)
    return per, parts


def nft_loss_bwd(g_per, v, v_old, target, r, t, parts, beta: float, adaptive: bool):
    """Gradient of ``nft_loss_fwd``'s per-sample loss with respect to v, one elementwise pass."""
    v, v_old, target, r, t = _check(v, v_old, target, r, t)
    batch = v.shape[0]
    n = v.numel() // batch
    if g_per.shape != (batch,) or parts.shape != (batch, _SUMS):
        raise ValueError(f"g_per must have shape ({batch},) and parts ({batch}, {_SUMS}), "
                         f"got {tuple(g_per.shape)} and {tuple(parts.shape)}")
    gv = torch.empty_like(v)
    grid = lambda meta: (batch * triton.cdiv(n, meta["BLOCK"]),)
    _nft_bwd_kernel[grid](g_per.contiguous(), v, v_old, target, r, t, parts.contiguous(), gv, n,
                          1.0 - beta, 1.0 + beta, beta, ADAPTIVE=bool(adaptive), **fixed_meta())
    return gv
