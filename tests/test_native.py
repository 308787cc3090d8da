"""The compiled extension ``dancegrpo._C`` on its own: op registration (opcheck), C++-level input
checks, torch.compile through the ops, and 64-bit offsets. Numerical parity with the reference
lives in test_ops_parity.py."""

from __future__ import annotations

import math

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import get_backend


@pytest.fixture(autouse=True)
def _native_built():
    """``make setup`` builds the extension: without it these tests fail with the reason."""
    reasons = get_backend("native").unavailable_reasons()
    if reasons:
        pytest.fail("native backend unavailable: " + "; ".join(reasons))


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
B = 3
SHAPE = (B, 4, 5, 7)


def ops():
    return torch.ops.dancegrpo


def _coeffs():
    return dg.flow_sde_coeffs(torch.tensor([0.9, 0.7, 0.45]), torch.tensor([0.85, 0.62, 0.4]), 0.3)


def _step_tensors(dtypes=(BF16, F32, F32), grad=False):
    c = _coeffs()
    v, x = torch.randn(SHAPE).to(dtypes[0]), torch.randn(SHAPE).to(dtypes[1])
    col = (-1, 1, 1, 1)
    y = (c.a.view(col) * x.float() + c.b.view(col) * v.float() + c.std.view(col) * torch.randn(SHAPE)).to(dtypes[2])
    if grad:
        v, x, y = (t.requires_grad_() for t in (v, x, y))
    return v, x, y, c.a, c.b, c.std


def test_module_reports_build_and_threads():
    from dancegrpo import _C

    assert isinstance(_C.cuda_built(), bool)
    assert _C.cuda_built() == ("cuda" in get_backend("native").devices)
    if torch.version.cuda is None:
        assert not _C.cuda_built()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.omp_max_threads() == 1  # the kernels' OpenMP regions follow torch's setting
    finally:
        torch.set_num_threads(threads)
    assert _C.omp_max_threads() == threads


# ---- opcheck: schema, autograd registration, fake (Meta) kernels, AOT dispatch with dynamic shapes

def _opcheck_cases():
    def logprob_fwd(v_ref, sum_, dtypes):
        v, x, y, a, b, s = _step_tensors(dtypes, grad=True)
        ref = torch.randn(SHAPE).to(v.dtype) if v_ref else None
        return ops().logprob_fwd.default, (v, x, y, ref, a, b, s, sum_)

    def logprob_bwd(with_msd, need):
        v, x, y, a, b, s = _step_tensors()
        ref = torch.randn(SHAPE).to(v.dtype) if with_msd else None
        g_msd = torch.randn(B) if with_msd else None
        return ops().logprob_bwd.default, (torch.randn(B), g_msd, v, x, y, ref, a, b, s, False, *need)

    def sample_step(dtypes, sum_):
        v, x, _, a, b, s = _step_tensors(dtypes)
        return ops().sample_step.default, (v, x, torch.randn(SHAPE), a, b, s, sum_)

    def group_advantages(std_mode, aggregate, drop):
        r = torch.randn(12, 2)
        r[5, 1] = float("nan")
        return ops().group_advantages.default, (r, torch.tensor([0.7, -1.2]), 4, std_mode, True, 1e-8, 5.0,
                                                aggregate, drop)

    def policy(bwd, with_ref, reduction):
        logp = (torch.randn(B) - 3).requires_grad_(not bwd)
        old = logp.detach() + 2e-4 * torch.randn(B)
        ref = logp.detach() + 0.1 * torch.randn(B) if with_ref else None
        if not bwd:
            return ops().policy_loss_fwd.default, (logp, old, torch.randn(B), ref, 1e-4, 2e-4, 0.04, reduction)
        g = torch.randn(B) if reduction == 2 else torch.randn(())
        return ops().policy_loss_bwd.default, (g, logp, old, torch.randn(B), ref, 1e-4, 2e-4, 0.04, reduction)

    return {
        "logprob_fwd-mixed": lambda: logprob_fwd(False, False, (BF16, F32, F32)),
        "logprob_fwd-v_ref-sum": lambda: logprob_fwd(True, True, (BF16, F32, F32)),
        "logprob_fwd-fp16": lambda: logprob_fwd(True, False, (F16, F16, F16)),
        "logprob_bwd-msd-vx": lambda: logprob_bwd(True, (True, True, False)),
        "logprob_bwd-vy": lambda: logprob_bwd(False, (True, False, True)),
        "logprob_bwd-none": lambda: logprob_bwd(False, (False, False, False)),
        "sample_step-mixed": lambda: sample_step((BF16, F32, F32), False),
        "sample_step-bf16-sum": lambda: sample_step((BF16, BF16, BF16), True),
        "group_advantages-group": lambda: group_advantages(0, False, True),
        "group_advantages-global-reward": lambda: group_advantages(1, True, True),
        "group_advantages-none": lambda: group_advantages(2, False, True),
        "policy_loss_fwd-mean": lambda: policy(False, False, 0),
        "policy_loss_fwd-ref-sum": lambda: policy(False, True, 1),
        "policy_loss_fwd-ref-none": lambda: policy(False, True, 2),
        "policy_loss_bwd-mean": lambda: policy(True, False, 0),
        "policy_loss_bwd-ref-none": lambda: policy(True, True, 2),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case, seed):
    op, args = _opcheck_cases()[case]()
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ---- input checks in C++ (the raw ops bypass the Python layer) -------------------------------

def _bad_calls():
    v, x, y, a, b, s = _step_tensors()
    g = torch.randn(B)
    lp = torch.randn(B)
    meta = [t.to("meta") for t in (v, x, y, a, b, s)]
    rewards = torch.randn(6, 2)
    w = torch.ones(2)
    return [
        (lambda: ops().logprob_fwd(v, x[:, :2].contiguous(), y, None, a, b, s, False), ValueError,
         r"logprob_fwd: x has shape \[3, 2, 5, 7\] but v has shape \[3, 4, 5, 7\]"),
        (lambda: ops().logprob_fwd(v.int(), x, y, None, a, b, s, False), TypeError,
         "v must be float32, bfloat16 or float16, got Int"),
        (lambda: ops().logprob_fwd(v, x.double(), y, None, a, b, s, False), TypeError, "x must be float32"),
        (lambda: ops().logprob_fwd(v, x, y, None, a.double(), b, s, False), TypeError,
         "a must be a float32 per-sample tensor"),
        (lambda: ops().logprob_fwd(v, x, y, None, a, b, torch.ones(B + 1), False), ValueError,
         r"std must have shape \(3,\), got \[4\]"),
        (lambda: ops().logprob_fwd(v, x, y, v[:, :1].contiguous(), a, b, s, False), ValueError, "v_ref has shape"),
        (lambda: ops().logprob_fwd(v[:0], x[:0], y[:0], None, a[:0], b[:0], s[:0], False), ValueError,
         r"empty batch \(B = 0\)"),
        (lambda: ops().logprob_fwd(v[:, :0], x[:, :0], y[:, :0], None, a, b, s, False), ValueError,
         "empty samples"),
        (lambda: ops().logprob_fwd(v.sum(), x.sum(), y.sum(), None, a, b, s, False), ValueError,
         "must have a batch dimension"),
        (lambda: ops().logprob_fwd(*meta[:3], None, *meta[3:], False), None, None),  # meta: fine
        (lambda: ops().logprob_fwd(meta[0], meta[1][:, :2], *meta[2:3], None, *meta[3:], False), ValueError,
         "x has shape"),  # the Meta kernel checks too, so tracing fails like eager
        (lambda: ops().logprob_bwd(g, g, v, x, y, None, a, b, s, False, True, False, False), ValueError,
         "g_msd was given but v_ref is None"),
        (lambda: ops().logprob_bwd(g[:2], None, v, x, y, None, a, b, s, False, True, False, False), ValueError,
         r"g_logp must have shape \(3,\)"),
        (lambda: ops().sample_step(v, x, torch.randn(B, 5), a, b, s, False), ValueError, "noise has shape"),
        (lambda: ops().group_advantages(rewards, w, 4, 0, True, 1e-8, 5.0, False, False), ValueError,
         "group_size=4 does not divide the batch B=6"),
        (lambda: ops().group_advantages(rewards, w, 3, 3, True, 1e-8, 5.0, False, False), ValueError,
         "std_mode must be 0"),
        (lambda: ops().group_advantages(rewards[:, 0], w[:1], 3, 0, True, 1e-8, 5.0, False, False), ValueError,
         r"rewards must have shape \(B, K\)"),
        (lambda: ops().group_advantages(rewards, torch.ones(3), 3, 0, True, 1e-8, 5.0, False, False), ValueError,
         r"weights must have shape \(K,\)"),
        (lambda: ops().group_advantages(rewards.double(), w, 3, 0, True, 1e-8, 5.0, False, False), TypeError,
         "rewards must be float32"),
        (lambda: ops().group_advantages(rewards, w, 3, 0, True, -1.0, 5.0, False, False), ValueError,
         "eps must be finite and >= 0"),
        (lambda: ops().policy_loss_fwd(lp, lp, lp, None, 1e-4, 1e-4, 0.0, 3), ValueError, "reduction must be 0"),
        (lambda: ops().policy_loss_fwd(lp, lp, lp, None, 1.0, 1e-4, 0.0, 0), ValueError,
         r"clip_low must lie in \[0, 1\)"),
        (lambda: ops().policy_loss_fwd(lp, lp, lp, lp, 1e-4, 1e-4, -0.1, 0), ValueError, "beta must be finite"),
        (lambda: ops().policy_loss_fwd(lp, lp[:2], lp, None, 1e-4, 1e-4, 0.0, 0), ValueError,
         r"old_logp must have shape \(3,\)"),
        (lambda: ops().policy_loss_bwd(torch.ones(()), lp, lp, lp, None, 1e-4, 1e-4, 0.0, 2), ValueError,
         r"g_loss must have shape \(3,\)"),
        (lambda: ops().policy_loss_bwd(torch.ones(B), lp, lp, lp, None, 1e-4, 1e-4, 0.0, 0), ValueError,
         "g_loss must be 0-d"),
    ]


def test_cpp_input_checks():
    for i, (call, exc, match) in enumerate(_bad_calls()):
        if exc is None:
            call()
            continue
        with pytest.raises(exc, match=match):
            call()
            pytest.fail(f"case {i} did not raise")


# ---- dtype conversions (csrc/cpu/tile.h) -----------------------------------------------------

def _fp32_sweep() -> torch.Tensor:
    """fp32 values around every fp16/bf16 rounding regime: a strided sweep of all bit patterns,
    exact ties and their neighbours, subnormal/normal/overflow boundaries, inf and NaN."""
    bits = torch.arange(0, 2**32, 4093, dtype=torch.int64)
    edges = [0.5, 1.0, 1.5, 65504.0, 65519.0, 65520.0, 65536.0, 6.1035156e-05, 5.9604645e-08, 2.9802322e-08,
             2.0**-25 * 3, 2.0**-24 * 1.5, 2.0**-24 * 2.5, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
             1.0 + 3 * 2.0**-8, 3.3895314e38, 1e-40, float("inf"), float("nan")]
    e = torch.tensor(edges, dtype=F32)
    e_bits = e.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    near = (e_bits[:, None] + torch.arange(-2, 3)).flatten().clamp(0, 2**32 - 1)
    all_bits = torch.cat([bits, near, near | 0x80000000])
    values = (all_bits - ((all_bits >= 2**31).to(torch.int64) << 32)).to(torch.int32).view(F32)
    return values[values != 0]  # -0.0 would come back as +0.0 from 0 + (-0.0)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_dtype_conversions_match_torch(dtype):
    """Every fp16 / bf16 value read as fp32, and a dense sweep of fp32 values rounded to fp16 / bf16,
    exactly as torch converts them (round to nearest even, subnormals, overflow to inf, NaN)."""
    # Read: y = 0 * x + 1 * v + 1 * 0 stored in fp32 is float(v).
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    n = v.numel()
    one = torch.ones(1)
    y, _ = ops().sample_step(v.view(1, n), torch.ones(1, n), torch.zeros(1, n), 0 * one, one, one, False)
    expected = v.float().view(1, n)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan) and torch.equal(y[~nan], expected[~nan])
    # Write: y = 0 * x + 0 * v + 1 * noise stored in x's dtype is noise rounded to that dtype.
    f = _fp32_sweep()
    m = f.numel()
    x = torch.ones(1, m, dtype=dtype)
    y, _ = ops().sample_step(torch.ones(1, m), x, f.view(1, m), 0 * one, 0 * one, one, False)
    expected = f.to(dtype).view(1, m)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    same = y[~nan].view(torch.int16) == expected[~nan].view(torch.int16)
    assert same.all(), f"{int((~same).sum())} values rounded differently, e.g. {f.view(1, m)[~nan][~same][:5]}"


# ---- torch.compile ----------------------------------------------------------------------------

def test_torch_compile_fullgraph_matches_eager(seed):
    """grpo_step_loss (log-prob + KL + clipped loss) and its backward compile into one graph.

    backend="aot_eager": it traces through the Meta kernels and the registered autograd exactly as
    inductor does, without inductor's ~30 s of C++ codegen on this 2-core machine.
    """
    v, x, y, *_ = _step_tensors(grad=False)
    v.requires_grad_()
    v_ref = (v.detach().float() + 0.1 * torch.randn(SHAPE)).to(v.dtype)
    coeffs = _coeffs()
    old = dg.step_logprob(v.detach(), x, y, coeffs, backend="native") - 1e-4 * torch.randn(B)
    adv = torch.randn(B)

    def step(v, x, y, v_ref, old, adv):
        loss, stats = dg.grpo_step_loss(v, x, y, coeffs, old, adv, ref_model_output=v_ref, beta=0.02,
                                        backend="native")
        return loss, stats["logp"], stats["kl"], stats["clip_fraction"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = compiled(v, x, y, v_ref, old, adv)
    (grad_c,) = torch.autograd.grad(outs[0], v)
    eager = step(v, x, y, v_ref, old, adv)
    (grad_e,) = torch.autograd.grad(eager[0], v)
    for c, e in zip(outs, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    assert torch.equal(grad_c, grad_e)
    # Another batch size retraces (fullgraph still: a graph break would raise) and stays exact.
    v2, x2, y2 = (t[:2].detach() for t in (v, x, y))
    coeffs = coeffs[:2]
    args = (v2.requires_grad_(), x2, y2, v_ref[:2], old[:2], adv[:2])
    for c, e in zip(compiled(*args), step(*args), strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


# ---- 64-bit offsets ---------------------------------------------------------------------------

def _pattern(n: int, dtype: torch.dtype, scale: float, shift: int) -> torch.Tensor:
    """n values from a random block of odd length 2^20 + 3 tiled (filling 2^31 values with randn
    would take minutes). The odd period is coprime with 2^31 and 2^32, so an offset that wrapped
    at 32 bits would read different values, not a copy of the right ones."""
    block = ((torch.randn(2**20 + 3) * scale) + shift * 0.01).to(dtype)
    out = torch.empty(n, dtype=dtype)
    for i in range(0, n, block.numel()):
        m = min(block.numel(), n - i)
        out[i:i + m] = block[:m]
    return out


def _check_long_samples(batch: int, n: int, chunk: int) -> None:
    """bf16 step_logprob forward + backward on (batch, n), checked against float64 computed chunk by
    chunk. next_latents is the latents tensor itself (a valid, if unusual, input) to save memory."""
    a, b, std = torch.tensor([0.98, 0.95]), torch.tensor([-0.02, -0.05]), torch.tensor([0.06, 0.1])
    coeffs = dg.StepCoeffs(a, b, std)
    v = _pattern(batch * n, BF16, 1.0, 1).view(batch, n).requires_grad_()
    x = _pattern(batch * n, BF16, 1.0, 2).view(batch, n)
    logp = dg.step_logprob(v, x, x, coeffs, backend="native")
    (gv,) = torch.autograd.grad(logp.sum(), v)

    for s in range(batch):
        sq, sd = 0.0, float(std[s])
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            xs = x[s, sl].double()
            r = xs - (float(a[s]) * xs + float(b[s]) * v.detach()[s, sl].double())
            sq += float((r * r).sum())
            k = float(b[s]) / (sd * sd * n)
            ref = k * r  # d logp / d v
            # The kernel rounds once to bf16 (half an ulp) a value computed in fp32, whose residual
            # carries at most a few fp32 roundings of the operands (the cancellation in y - mean).
            ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=1e-30))))
            fp32_err = 4 * 2.0**-24 * (xs.abs() * (1 + abs(float(a[s]))) + abs(float(b[s])) * v.detach()[s, sl].double().abs())
            allowed = 0.5 * ulp * 2.0**-7 + abs(k) * fp32_err + 4 * ulp * 2.0**-23
            assert ((gv[s, sl].double() - ref).abs() <= allowed).all(), (s, i)
        expected = -sq / (2 * sd * sd * n) - math.log(sd) - 0.5 * math.log(2 * math.pi)
        # fp32 residuals, per-tile fp32 sums combined in double: relative error ~1e-7 expected.
        assert abs(logp[s].item() - expected) <= 1e-5 * max(1.0, abs(expected)), (s, logp[s].item(), expected)


def test_long_samples_checker(seed):
    """The check below on a small size (many tiles, a ragged last one), so it runs in every CI."""
    _check_long_samples(2, 5 * 4096 + 4099, chunk=3000)


@pytest.mark.bigmem
@pytest.mark.slow
def test_step_logprob_beyond_2_31_elements():
    """2^31 + 8198 elements: sample 1 lies across and beyond offset 2^31, so any 32-bit offset
    wraps. About 13 GiB: v, x and the gradient of v, 4 GiB each (bf16)."""
    torch.manual_seed(1234)
    _check_long_samples(2, 2**30 + 4099, chunk=1 << 24)
