"""``step_logprob``: log N(y; a x + b v, std^2) per sample, forward and backward.

Math, per sample of N elements, with mean = a x + b v and r = y - mean (D = N for the
default "mean" reduction, D = 1 for "sum"):

    logp = -sum(r^2) / (2 std^2 D) - (N / D) (log std + log sqrt(2 pi))
    msd  = sum((v - v_ref)^2) / N                                    (only with v_ref)
    d logp/dv = b r / (std^2 D),  d logp/dx = a r / (std^2 D),  d logp/dy = -r / (std^2 D)
    d msd/dv  = 2 (v - v_ref) / N

Forward shape. N reaches 1e7-1e8 for video latents while B is 1 to 16, so one program per
sample would leave most of the GPU idle. The forward is a split reduction: a 1-D grid over
(sample, tile) pairs (1-D because grid.y/z stop at 65535), each program sums one tile of
``block * iters`` elements into fp32 per-lane accumulators and writes one fp32 partial per tile
to a (B, tiles) buffer; a second, tiny kernel adds each sample's partials in a fixed order, in
fp64, and finishes logp and msd. No atomics, so the same inputs give bit-identical results run
to run. Inputs of any mix of fp32/bf16/fp16 are loaded as they are and converted in registers
(a bf16 model output is never copied to fp32). Offsets are 64-bit: B * N passes 2^31 for video
batches. The optional v_ref is read in the same pass (``HAS_REF`` is structural: it changes
what the kernel reads, not a per-step value).

Backward shape. Elementwise: each program loads its sample's scalars, recomputes the mean
from the inputs (nothing of size N is saved for backward) and writes only the gradients that
autograd asks for, each in its input's dtype, in one pass over memory.

Per-step values (a, b, std, the incoming gradients) are read from device tensors, so a new
sigma or eta never recompiles a kernel and never syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import COMBINE_BLOCK, LOG_SQRT_2PI, cast_to, fixed_meta, maybe_autotune, reduce_config


@triton.jit
def _affine_mean(v, x, a, b):
    # One definition of the mean shared by every kernel, so sample_step and logprob_fwd round
    # it identically and agree bit for bit on the stored sample.
    return a * x + b * v


@triton.jit
def _block_lanes(BLOCK: tl.constexpr):
    # A block of BLOCK consecutive elements as a [BLOCK / 4, 4] tile (row q = elements 4q..4q+3):
    # the shape in which sample_step's Philox produces four normals per call, so both reduction
    # kernels share one register layout (no shared-memory shuffle) and one summation tree.
    return 4 * tl.arange(0, BLOCK // 4)[:, None] + tl.arange(0, 4)[None, :]


@triton.jit
def _block_sum(acc):
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def _logprob_fwd_kernel(v_ptr, x_ptr, y_ptr, vref_ptr, a_ptr, b_ptr, sse_ptr, ssd_ptr, N, tiles,
                        HAS_REF: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // tiles
    tile = pid % tiles
    a = tl.load(a_ptr + sample).to(tl.float32)
    b = tl.load(b_ptr + sample).to(tl.float32)
    base = sample.to(tl.int64) * N
    start = tile.to(tl.int64) * (BLOCK * ITERS)
    lanes = _block_lanes(BLOCK)
    sse = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    ssd = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    for it in range(ITERS):
        idx = start + it * BLOCK + lanes
        mask = idx < N
        offs = base + idx
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = y - _affine_mean(v, x, a, b)
        sse += tl.where(mask, r * r, 0.0)
        if HAS_REF:
            d = v - tl.load(vref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            ssd += d * d
    tl.store(sse_ptr + pid, _block_sum(sse))
    if HAS_REF:
        tl.store(ssd_ptr + pid, _block_sum(ssd))


@triton.jit(do_not_specialize=["N"])
def _logprob_combine_kernel(sse_ptr, ssd_ptr, std_ptr, logp_ptr, msd_ptr, N, tiles,
                            LOG_SQRT_2PI_C: tl.constexpr, IS_SUM: tl.constexpr, HAS_REF: tl.constexpr,
                            BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    row = sample.to(tl.int64) * tiles
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float64)
    for t0 in range(0, tiles, BLOCK):  # fixed order: the result never depends on timing
        t = t0 + lanes
        mask = t < tiles
        acc += tl.load(sse_ptr + row + t, mask=mask, other=0.0).to(tl.float64)
        if HAS_REF:
            acc_ref += tl.load(ssd_ptr + row + t, mask=mask, other=0.0).to(tl.float64)
    n = N.to(tl.float64)
    std32 = tl.load(std_ptr + sample).to(tl.float32)
    std = std32.to(tl.float64)
    log_norm = tl.log(std32).to(tl.float64) + LOG_SQRT_2PI_C
    if IS_SUM:
        logp = -tl.sum(acc, axis=0) / (2.0 * std * std) - n * log_norm
    else:
        logp = -tl.sum(acc, axis=0) / (2.0 * std * std * n) - log_norm
    tl.store(logp_ptr + sample, logp.to(tl.float32))
    if HAS_REF:
        tl.store(msd_ptr + sample, (tl.sum(acc_ref, axis=0) / n).to(tl.float32))


@triton.jit
def _logprob_bwd_body(g_ptr, gm_ptr, v_ptr, x_ptr, y_ptr, vref_ptr, a_ptr, b_ptr, std_ptr,
                      gv_ptr, gx_ptr, gy_ptr, N, scale, msd_scale,
                      HAS_REF: tl.constexpr, NEED_V: tl.constexpr, NEED_X: tl.constexpr,
                      NEED_Y: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tiles = tl.cdiv(N, BLOCK)
    sample = pid // tiles
    tile = pid % tiles
    a = tl.load(a_ptr + sample).to(tl.float32)
    b = tl.load(b_ptr + sample).to(tl.float32)
    std = tl.load(std_ptr + sample).to(tl.float32)
    k = tl.load(g_ptr + sample).to(tl.float32) * scale / (std * std)  # g_logp / (std^2 D)
    idx = tile.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = sample.to(tl.int64) * N + idx
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kr = k * (y - _affine_mean(v, x, a, b))
    if NEED_V:
        gv = b * kr
        if HAS_REF:
            gm = tl.load(gm_ptr + sample).to(tl.float32) * msd_scale
            gv += gm * (v - tl.load(vref_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        tl.store(gv_ptr + offs, cast_to(gv, gv_ptr.dtype.element_ty), mask=mask)
    if NEED_X:
        tl.store(gx_ptr + offs, cast_to(a * kr, gx_ptr.dtype.element_ty), mask=mask)
    if NEED_Y:
        tl.store(gy_ptr + offs, cast_to(-kr, gy_ptr.dtype.element_ty), mask=mask)


# The elementwise backward's block size does not change its results, so it is autotuned on GPU.
_logprob_bwd_kernel = maybe_autotune(_logprob_bwd_body, key=["N", "HAS_REF", "NEED_V", "NEED_X", "NEED_Y"])


def _check_big(name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.shape != like.shape or t.device != like.device:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} on {like.device}, "
                         f"got {tuple(t.shape)} on {t.device}")
    return t.contiguous()


def _check_scalars(batch: int, **named) -> list[torch.Tensor]:
    out = []
    for name, t in named.items():
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
        out.append(t.contiguous())
    return out


def _combine(sse, ssd, std, batch, n, tiles, is_sum, has_ref):
    """Finish logp (and msd) from the (B, tiles) partial sums; returns fp32 (B,) tensors."""
    logp = torch.empty(batch, dtype=torch.float32, device=std.device)
    msd = torch.empty(batch if has_ref else 0, dtype=torch.float32, device=std.device)
    _logprob_combine_kernel[(batch,)](
        sse, ssd if has_ref else sse, std, logp, msd if has_ref else logp, n, tiles,
        LOG_SQRT_2PI_C=LOG_SQRT_2PI, IS_SUM=bool(is_sum), HAS_REF=has_ref, BLOCK=COMBINE_BLOCK, num_warps=4)
    return logp, msd


def logprob_fwd(v, x, y, v_ref, a, b, std, is_sum: bool):
    """Per-sample log-prob of ``y`` under N(a x + b v, std^2), and msd against ``v_ref``.

    v, x, y, v_ref: (B, ...) same shape, fp32/bf16/fp16 (dtypes may differ). a, b, std: (B,).
    Returns ``(logp, msd)``: fp32 (B,); msd is (0,) without v_ref.

    Equivalent PyTorch::

        mean = a[:, None] * x.flatten(1) + b[:, None] * v.flatten(1)
        elem = -(y.flatten(1) - mean) ** 2 / (2 * std[:, None] ** 2) - std[:, None].log() - LOG_SQRT_2PI
        logp = elem.sum(1) if is_sum else elem.mean(1)
        msd = ((v - v_ref).flatten(1) ** 2).mean(1)
    """
    batch = v.shape[0]
    n = v.numel() // batch
    v = v.contiguous()
    x, y = _check_big("x", x, v), _check_big("y", y, v)
    has_ref = v_ref is not None
    vref = _check_big("v_ref", v_ref, v) if has_ref else v
    a, b, std = _check_scalars(batch, a=a, b=b, std=std)
    cfg = reduce_config(n)
    tiles = triton.cdiv(n, cfg.tile)
    sse = torch.empty(batch * tiles, dtype=torch.float32, device=v.device)
    ssd = torch.empty(batch * tiles if has_ref else 0, dtype=torch.float32, device=v.device)
    _logprob_fwd_kernel[(batch * tiles,)](
        v, x, y, vref, a, b, sse, ssd if has_ref else sse, n, tiles,
        HAS_REF=has_ref, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps)
    return _combine(sse, ssd, std, batch, n, tiles, is_sum, has_ref)


def logprob_bwd(g_logp, g_msd, v, x, y, v_ref, a, b, std, is_sum: bool, need_v: bool, need_x: bool,
                need_y: bool):
    """Gradients of ``logprob_fwd`` in one elementwise pass (see the module docstring).

    g_logp: (B,); g_msd: (B,) or None (ignored without v_ref). Returns ``(gv, gx, gy)`` in the
    dtype and shape of v, x, y; a gradient that is not needed is an empty (0,) tensor.
    """
    batch = v.shape[0]
    n = v.numel() // batch
    v = v.contiguous()
    x, y = _check_big("x", x, v), _check_big("y", y, v)
    has_ref = v_ref is not None and g_msd is not None and need_v
    vref = _check_big("v_ref", v_ref, v) if has_ref else v
    g_logp, a, b, std = _check_scalars(batch, g_logp=g_logp, a=a, b=b, std=std)
    gm = _check_scalars(batch, g_msd=g_msd)[0] if has_ref else g_logp
    gv = torch.empty_like(v) if need_v else v.new_empty(0)
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gy = torch.empty_like(y) if need_y else y.new_empty(0)
    if not (need_v or need_x or need_y):
        return gv, gx, gy
    grid = lambda meta: (batch * triton.cdiv(n, meta["BLOCK"]),)
    _logprob_bwd_kernel[grid](
        g_logp, gm, v, x, y, vref, a, b, std,
        gv if need_v else v, gx if need_x else x, gy if need_y else y, n,
        1.0 if is_sum else 1.0 / n, 2.0 / n,
        HAS_REF=has_ref, NEED_V=bool(need_v), NEED_X=bool(need_x), NEED_Y=bool(need_y), **fixed_meta())
    return gv, gx, gy
