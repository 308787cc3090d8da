"""``sample_step``: the rollout step y = a x + b v + std * eps and log p(y), in one pass.

Math, per sample: mean = a x + b v; y = mean + std eps, stored in x's dtype; then logp is
the log-prob (see ``step_logprob``) of the *stored* y, i.e. with r = round(y) - mean, so that
``step_logprob`` on the stored rollout reproduces it.

Shape. The same (sample, tile) split reduction as ``logprob_fwd``, with the same tiling table
and the same mean/residual arithmetic, and the same combine kernel: the logp a rollout records
and the logp the first training forward recomputes from the stored latents come from the same
summation tree (bit-identical under the interpreter, where this is tested). Each program also
writes its tile of y, so the step reads v and x once and writes y once.

Noise. Either read from a given tensor, or drawn in the kernel (``HAS_NOISE=False``) with
Triton's counter-based Philox-4x32-10: element i of sample s takes lane i % 4 of
``randn4x(seed, counter = s * ceil(N / 4) + i // 4)`` (Box-Muller on both halves of each
Philox output, so one Philox call serves four elements). The noise is a pure function of
(seed, s, i, N): it does not depend on block sizes or on the GPU, and it never touches memory.
The 64-bit seed is a 1-element int64 device tensor drawn from the caller's torch generator and
loaded inside the kernel, so drawing it never syncs with the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import cast_to, reduce_config
from .step_logprob import (
    _affine_mean,
    _block_lanes,
    _block_sum,
    _check_big,
    _check_scalars,
    _combine,
)


@triton.jit
def _philox_normal(seed, counter_base, BLOCK: tl.constexpr):
    """N(0, 1) for BLOCK consecutive elements from element 4 * counter_base, as a [BLOCK / 4, 4] tile."""
    counters = counter_base + tl.arange(0, BLOCK // 4)
    n0, n1, n2, n3 = tl.randn4x(seed, counters)
    # join(join(n0, n2), join(n1, n3)) has element [q, t, u] = n_{2t+u}: row q of the reshaped
    # tile holds the four normals of counter q, in order (elements 4q .. 4q+3).
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK // 4, 4))


@triton.jit
def _sample_step_fwd_kernel(v_ptr, x_ptr, noise_ptr, seed_ptr, a_ptr, b_ptr, std_ptr, y_ptr, sse_ptr,
                            N, tiles, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    sample = pid // tiles
    tile = pid % tiles
    a = tl.load(a_ptr + sample).to(tl.float32)
    b = tl.load(b_ptr + sample).to(tl.float32)
    std = tl.load(std_ptr + sample).to(tl.float32)
    base = sample.to(tl.int64) * N
    start = tile.to(tl.int64) * (BLOCK * ITERS)
    lanes = _block_lanes(BLOCK)
    if not HAS_NOISE:
        seed = tl.load(seed_ptr)
        counter0 = sample.to(tl.int64) * ((N + 3) // 4)
    sse = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    for it in range(ITERS):
        first = start + it * BLOCK
        idx = first + lanes
        mask = idx < N
        offs = base + idx
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            eps = _philox_normal(seed, counter0 + first // 4, BLOCK)  # BLOCK % 4 == 0: aligned
        mean = _affine_mean(v, x, a, b)
        y = cast_to(mean + std * eps, y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs, y, mask=mask)
        r = y.to(tl.float32) - mean  # the log-prob of the value actually stored
        sse += tl.where(mask, r * r, 0.0)
    tl.store(sse_ptr + pid, _block_sum(sse))


def sample_step_fwd(v, x, noise, seed, a, b, std, is_sum: bool):
    """One rollout step and its log-prob.

    v, x: (B, ...) same shape, fp32/bf16/fp16. noise: (B, ...) any float dtype, or None to draw
    it in the kernel from ``seed``: a 1-element int64 tensor on the data's device. a, b, std:
    (B,). Returns ``(y, logp)``: y in x's dtype and shape, logp fp32 (B,) of the stored y.

    Equivalent PyTorch (with noise given)::

        y = (a * x + b * v + std * noise).to(x.dtype)          # a, b, std broadcast per sample
        logp = logprob_fwd(v, x, y, None, a, b, std, is_sum)[0]
    """
    batch = v.shape[0]
    n = v.numel() // batch
    x = x.contiguous()
    v = _check_big("v", v, x)
    has_noise = noise is not None
    if has_noise:
        noise = _check_big("noise", noise, x)
    elif seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
        raise ValueError(f"seed must be a 1-element int64 tensor on {x.device} when noise is None")
    a, b, std = _check_scalars(batch, a=a, b=b, std=std)
    cfg = reduce_config(n)  # the same tiling as logprob_fwd: see _config.py
    tiles = triton.cdiv(n, cfg.tile)
    y = torch.empty_like(x)
    sse = torch.empty(batch * tiles, dtype=torch.float32, device=x.device)
    _sample_step_fwd_kernel[(batch * tiles,)](
        v, x, noise if has_noise else x, seed if not has_noise else a, a, b, std, y, sse, n, tiles,
        HAS_NOISE=has_noise, BLOCK=cfg.block, ITERS=cfg.iters, num_warps=cfg.num_warps)
    logp, _ = _combine(sse, None, std, batch, n, tiles, is_sum, False)
    return y, logp
