"""Launch configuration shared by the kernels: interpreter mode and block-size tables.

Block sizes of the *reductions* are a fixed function of the per-sample size N, not autotuned:
the order of a floating-point sum depends on the tiling, and a timing-based choice could
differ between two processes (or between ``sample_step`` and ``logprob_fwd``), which would
make log-probs differ in their last bits. With one table, the rollout's logp and the training
forward's logp of the same stored sample are computed by the same summation tree, which is
what keeps the first importance ratio after a rollout at exactly 1.
Elementwise kernels, whose results do not depend on the block size, are autotuned on GPU.

Under ``TRITON_INTERPRET=1`` (tests on CPU) blocks are deliberately tiny so that small test
shapes still cover multi-tile samples, ragged tails and multi-iteration loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

# Read once, like triton.jit does when the kernels below it are defined.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
_INTERPRETED = tl.constexpr(INTERPRET)

LOG_SQRT_2PI = 0.9189385332046727  # 0.5 * log(2 pi)


@dataclass(frozen=True)
class ReduceConfig:
    """Tiling of the (sample, tile) split reduction: each program sums ``block * iters`` elements."""

    block: int
    iters: int
    num_warps: int

    @property
    def tile(self) -> int:
        return self.block * self.iters


def reduce_config(n: int) -> ReduceConfig:
    """The tiling for samples of ``n`` elements (deterministic in ``n``; block a multiple of 4)."""
    if INTERPRET:
        return ReduceConfig(block=128, iters=2, num_warps=1)
    if n >= 1 << 20:  # video latents: 16 K elements per program, ~130 programs per sample at 2 M
        return ReduceConfig(block=2048, iters=8, num_warps=8)
    if n >= 1 << 15:  # image latents (e.g. 16 x 128 x 128 = 256 K): 4 K elements per program
        return ReduceConfig(block=2048, iters=2, num_warps=8)
    return ReduceConfig(block=max(128, min(2048, triton.next_power_of_2(n))), iters=1, num_warps=4)


# Partials per combine-loop iteration (the combine sums each sample's tiles in this order).
COMBINE_BLOCK = 8 if INTERPRET else 256

# Elementwise kernels (autotuned on GPU; fixed under the interpreter).
ELEMENTWISE_CONFIGS = (
    [triton.Config({"BLOCK": 256}, num_warps=1)] if INTERPRET else
    [triton.Config({"BLOCK": 1024}, num_warps=4),
     triton.Config({"BLOCK": 2048}, num_warps=8),
     triton.Config({"BLOCK": 4096}, num_warps=8),
     triton.Config({"BLOCK": 4096}, num_warps=16)]
)

# Single-program kernels over the batch (advantages, policy loss): elements per loop step.
BATCH_BLOCK = 16 if INTERPRET else 1024
BATCH_WARPS = 1 if INTERPRET else 4


def maybe_autotune(kernel, key):
    """``triton.autotune(ELEMENTWISE_CONFIGS, key)`` on GPU; the interpreter cannot time kernels,
    so there the first config is applied by the launcher instead (``fixed_meta``)."""
    if INTERPRET:
        return kernel
    return triton.autotune(configs=ELEMENTWISE_CONFIGS, key=key)(kernel)


def fixed_meta() -> dict:
    """Launch keywords for an elementwise kernel: none when autotuned, the fixed config otherwise."""
    if not INTERPRET:
        return {}
    cfg = ELEMENTWISE_CONFIGS[0]
    return dict(cfg.kwargs, num_warps=cfg.num_warps)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """fp32 ``x`` converted to ``dtype`` with round-to-nearest-even, as compiled Triton does.

    Triton's CPU interpreter (3.x) truncates fp32 -> bf16 instead of rounding, which would make
    the CPU tests see a different (and worse) bf16 result than the GPU; under the interpreter the
    bf16 rounding is therefore done with integer ops (NaN kept a NaN). Compiled kernels use the
    hardware conversion.
    """
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = tl.where(x == x, rounded, bits | 0x400000)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
