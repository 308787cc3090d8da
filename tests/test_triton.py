"""The Triton kernels (``dancegrpo.kernels``) and the ``"triton"`` backend.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest.py) on CPU tensors,
on small shapes whose tiling still has several tiles per sample, ragged tails and multi-step
loops (the interpreter's block sizes are tiny on purpose, see kernels/_config.py). With a GPU
the same tests run on CUDA tensors, and the ``gpu``-marked section at the end adds the
realistic video latent and the compiled-kernel cache checks.

Broad parity of every public op across backends lives in test_ops_parity.py; this file covers
what is specific to the Triton implementation: the custom-op registration (opcheck), the
in-kernel RNG, determinism, the no-recompile guarantee, poisoned outputs and torch.compile.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import dancegrpo
from dancegrpo.ops import reference as R
from dancegrpo.ops.dispatch import get_backend

BACKEND = get_backend("triton")

# Tolerances against the float64 reference. Outputs the kernels keep in fp32 (logp, msd,
# advantages, loss, stats) see the same input numbers as the reference, so they differ only by
# fp32 rounding of the sums: a few ulps relative, times the square root of the reduction length.
FP32_TOL = dict(rtol=2e-5, atol=2e-5)
# Tensors stored in the inputs' dtype (gradients, next latents): flash-attention's rule, at most
# 2x the error of rounding the exact value to that dtype, plus an fp32-level floor relative to the
# largest value (the kernels compute in fp32 before the single final rounding).
FP32_FLOOR = 1e-5


def assert_low_precision(out: torch.Tensor, exact: torch.Tensor, name: str):
    """max|out - exact| <= 2 max|round(exact) - exact| + floor * max|exact| (round: to out's dtype)."""
    exact = exact.double()
    own = (out.double() - exact).abs().max().item()
    rounding = (exact.to(out.dtype).double() - exact).abs().max().item()
    bound = 2 * rounding + FP32_FLOOR * exact.abs().max().item()
    assert own <= bound, f"{name} ({out.dtype}): max error {own:.3g} > bound {bound:.3g} (rounding {rounding:.3g})"


@pytest.fixture(scope="module")
def dev() -> str:
    reasons = BACKEND.unavailable_reasons()
    if reasons:  # triton is a dev dependency: a missing backend is a failure, not a skip
        pytest.fail("triton backend unavailable: " + "; ".join(reasons))
    if BACKEND.interpreted:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU")
    return "cuda"


@pytest.fixture(scope="module")
def ops(dev):
    return torch.ops.dancegrpo_triton


def coeffs(batch, dev, dtype=torch.float32):
    a = (torch.rand(batch, device=dev) * 0.5 + 0.75).to(dtype)
    b = (torch.randn(batch, device=dev) * 0.3).to(dtype)
    std = (torch.rand(batch, device=dev) + 0.3).to(dtype)
    return a, b, std


def latents(shape, dev, v_dtype=torch.float32, xy_dtype=torch.float32, ref=False):
    v = torch.randn(shape, device=dev).to(v_dtype)
    x = torch.randn(shape, device=dev).to(xy_dtype)
    y = torch.randn(shape, device=dev).to(xy_dtype)
    v_ref = (v.float() + 0.1 * torch.randn(shape, device=dev)).to(v_dtype) if ref else None
    return v, x, y, v_ref


class _PoisonTorch:
    """Stands in for ``torch`` inside a kernels module: every new float buffer starts as NaN,
    so an output element (or a partial sum) that a kernel forgets to write shows up as NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


@pytest.fixture
def poisoned(monkeypatch):
    from dancegrpo.kernels import advantages, policy_loss, sample_step, step_logprob

    for module in (advantages, policy_loss, sample_step, step_logprob):
        monkeypatch.setattr(module, "torch", _PoisonTorch())


# --------------------------------------------------------------------------- backend, import


def test_backend_reports_devices_and_reasons(dev):
    assert BACKEND.unavailable_reasons() == []
    assert "cuda" in BACKEND.devices
    assert ("cpu" in BACKEND.devices) == BACKEND.interpreted


def test_missing_triton_is_a_reason_not_a_crash(monkeypatch):
    from dancegrpo.ops import triton_backend

    monkeypatch.setattr(triton_backend.importlib.util, "find_spec", lambda name: None)
    fresh = triton_backend.TritonBackend()
    assert any("triton is not installed" in r for r in fresh.unavailable_reasons())
    assert fresh.devices == ("cuda",)
    with pytest.raises(RuntimeError, match="triton backend is unavailable"):
        fresh._ops()


# --------------------------------------------------------------------------- parity (poisoned)


@pytest.mark.parametrize("shape,v_dtype,xy_dtype,ref,is_sum", [
    ((3, 1237), torch.float32, torch.float32, True, False),    # 5 tiles per sample, ragged tail
    ((3, 5, 7, 11), torch.bfloat16, torch.float32, True, True),  # bf16 model output, fp32 latents
    ((2, 16, 33), torch.float16, torch.float16, False, False),
    ((4, 3), torch.float32, torch.bfloat16, False, True),      # N smaller than one block
])
def test_logprob_fwd_bwd_match_reference(ops, dev, poisoned, shape, v_dtype, xy_dtype, ref, is_sum):
    batch = shape[0]
    v, x, y, v_ref = latents(shape, dev, v_dtype, xy_dtype, ref)
    a, b, std = coeffs(batch, dev)
    logp, msd = ops.logprob_fwd(v, x, y, v_ref, a, b, std, is_sum)
    red = "sum" if is_sum else "mean"
    vd, xd, yd = (t.double().requires_grad_() for t in (v, x, y))
    ref_logp, ref_msd = R.step_logprob_ref(vd, xd, yd, a.double(), b.double(), std.double(), reduction=red,
                                           v_ref=None if v_ref is None else v_ref.double())
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **FP32_TOL)
    if ref:
        torch.testing.assert_close(msd.double(), ref_msd.detach(), **FP32_TOL)
    else:
        assert msd.shape == (0,)

    g = torch.randn(batch, device=dev)
    gm = torch.randn(batch, device=dev) if ref else None
    gv, gx, gy = ops.logprob_bwd(g, gm, v, x, y, v_ref, a, b, std, is_sum, True, True, True)
    outs, grads = [ref_logp], [g.double()]
    if ref:
        outs.append(ref_msd)
        grads.append(gm.double())
    torch.autograd.backward(outs, grads)
    for name, got, want, like in (("gv", gv, vd.grad, v), ("gx", gx, xd.grad, x), ("gy", gy, yd.grad, y)):
        assert got.dtype == like.dtype and got.shape == like.shape
        assert_low_precision(got, want, name)


def test_logprob_bwd_writes_only_requested_grads(ops, dev, poisoned):
    v, x, y, v_ref = latents((2, 300), dev, ref=True)
    a, b, std = coeffs(2, dev)
    g, gm = torch.randn(2, device=dev), torch.randn(2, device=dev)
    full = ops.logprob_bwd(g, gm, v, x, y, v_ref, a, b, std, False, True, True, True)
    gv, gx, gy = ops.logprob_bwd(g, gm, v, x, y, v_ref, a, b, std, False, True, False, False)
    assert gx.shape == (0,) and gy.shape == (0,)
    assert torch.equal(gv, full[0])
    gv, gx, gy = ops.logprob_bwd(g, gm, v, x, y, v_ref, a, b, std, False, False, False, True)
    assert gv.shape == (0,) and gx.shape == (0,)
    assert torch.equal(gy, full[2])


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_sample_step_with_noise_matches_reference(ops, dev, poisoned, x_dtype):
    v, x, _, _ = latents((3, 700), dev, torch.bfloat16, x_dtype)
    noise = torch.randn(3, 700, device=dev)
    a, b, std = coeffs(3, dev)
    y, logp = ops.sample_step(v, x, noise, a, b, std, False)
    ref_y, ref_logp = R.sample_step_ref(v, x, noise, a, b, std)
    assert y.dtype == x_dtype and y.shape == x.shape
    exact = (a[:, None].double() * x.double() + b[:, None].double() * v.double()
             + std[:, None].double() * noise.double())
    assert_low_precision(y, exact, "y")
    assert_low_precision(ref_y, exact, "reference y")  # the rule is one PyTorch itself meets
    # logp is of the stored y: recompute it with the fp64 reference from the kernel's own y.
    want, _ = R.step_logprob_ref(v.double(), x.double(), y.double(), a.double(), b.double(), std.double())
    torch.testing.assert_close(logp.double(), want, **FP32_TOL)
    torch.testing.assert_close(ref_logp.double(), want, **FP32_TOL)


@pytest.mark.parametrize("std_mode", [0, 1, 2])
@pytest.mark.parametrize("aggregate", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_group_advantages_match_reference(ops, dev, poisoned, std_mode, aggregate, drop):
    for group, k, unbiased, clip in ((5, 1, True, 5.0), (12, 2, False, None)):
        batch = 3 * group  # 3 groups: several group chunks; group 12 > the interpreter's 8-member block
        r = torch.randn(batch, k, device=dev)
        r[group:2 * group] = 1 / 3  # a constant group (its fp32 mean is inexact): exactly 0
        if drop:
            r[1, 0] = float("nan")
            r[2 * group:3 * group] = 1.5  # constant among its valid members once the inf is dropped
            r[2 * group + 1, k - 1] = float("inf")
        w = torch.tensor([1.0, -0.5][:k], device=dev)
        adv = ops.group_advantages(r, w, group, std_mode, unbiased, 1e-8, -1.0 if clip is None else clip,
                                   aggregate, drop)
        want = R.group_advantages_ref(r.double(), w.double(), group, std=R.STD_MODES[std_mode], unbiased=unbiased,
                                      clip=clip, aggregate="reward" if aggregate else "advantage",
                                      drop_nonfinite=drop)
        torch.testing.assert_close(adv.double(), want, **FP32_TOL)
        assert torch.equal(adv[group:2 * group], torch.zeros(group, device=dev))
        if drop:
            assert adv[1] == 0 and torch.equal(adv[2 * group:], torch.zeros(group, device=dev))


@pytest.mark.parametrize("std_mode", [0, 1, 2])
def test_constant_groups_are_exactly_zero(ops, dev, std_mode):
    # A constant group's fp32 mean need not equal its members (2.9 x 12 and 123.456 x 5 do not,
    # under the interpreter's summation order): without the max/min check their advantages
    # would be rounding noise divided by a tiny std, i.e. O(1) garbage.
    for group in (5, 12):
        for value in (1 / 3, 0.1, 2.9, 123.456, -7.77):
            r = torch.randn(3 * group, 1, device=dev)
            r[group:2 * group] = value
            adv = ops.group_advantages(r, torch.ones(1, device=dev), group, std_mode, True, 1e-8, 5.0, False, False)
            assert torch.equal(adv[group:2 * group], torch.zeros(group, device=dev)), (group, value)


def test_group_advantages_clip_applies(ops, dev):
    r = torch.tensor([[0.0], [0.0], [0.0], [1.0]], device=dev)  # the outlier's advantage is 1.5
    adv = ops.group_advantages(r, torch.ones(1, device=dev), 4, 0, True, 1e-8, 1.0, False, False)
    assert adv.max().item() == 1.0
    free = ops.group_advantages(r, torch.ones(1, device=dev), 4, 0, True, 1e-8, -1.0, False, False)
    assert free.max().item() == pytest.approx(1.5, rel=1e-6)


def _loss_inputs(batch, dev, clip_low, clip_high):
    # Log-ratios well inside, exactly at 0 (the max() tie), and outside on both sides, with
    # advantages of both signs and zero: every branch of the gradient rule.
    steps = torch.tensor([0.0, 0.3, -0.3, 3.0, -3.0, 0.0], device=dev)
    lr = steps[torch.arange(batch, device=dev) % steps.numel()]
    lr = torch.where(lr > 0, lr * clip_high, lr * clip_low)
    old = torch.randn(batch, device=dev) - 2.0
    adv = torch.randn(batch, device=dev)
    adv[::7] = 0.0
    ref = old + 0.05 * torch.randn(batch, device=dev)
    return (old + lr).float(), old.float(), adv, ref


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("with_ref,beta", [(False, 0.0), (True, 0.04), (True, 0.0)])
def test_policy_loss_fwd_bwd_match_reference(ops, dev, poisoned, reduction, with_ref, beta):
    clip_low, clip_high = 0.2, 0.28
    lp, old, adv, ref = _loss_inputs(37, dev, clip_low, clip_high)  # 37 = 3 loop steps of 16
    ref = ref if with_ref else None
    loss, stats = ops.policy_loss_fwd(lp, old, adv, ref, clip_low, clip_high, beta, reduction)
    lpd = lp.double().requires_grad_()
    want, want_stats = R.clipped_ratio_loss_ref(lpd, old.double(), adv.double(), clip_low=clip_low,
                                                clip_high=clip_high, ref_logp=None if ref is None else ref.double(),
                                                beta=beta, reduction=R.REDUCTIONS[reduction])
    torch.testing.assert_close(loss.double(), want.detach(), **FP32_TOL)
    torch.testing.assert_close(stats.double(), want_stats, **FP32_TOL)
    g = torch.randn(loss.shape, device=dev)
    grad = ops.policy_loss_bwd(g, lp, old, adv, ref, clip_low, clip_high, beta, reduction)
    want.backward(g.double())
    torch.testing.assert_close(grad.double(), lpd.grad, **FP32_TOL)


def test_policy_loss_gradient_rule(ops, dev):
    # grad = -A r except (r > 1 + hi, A > 0) and (r < 1 - lo, A < 0), where it is 0.
    lp = torch.log(torch.tensor([1.0, 1.5, 1.5, 0.5, 0.5], device=dev))
    adv = torch.tensor([2.0, 1.0, -1.0, 1.0, -1.0], device=dev)
    old = torch.zeros(5, device=dev)
    grad = ops.policy_loss_bwd(torch.tensor(1.0, device=dev), lp, old, adv, None, 0.2, 0.2, 0.0, 1)
    ratio = lp.exp()
    expected = torch.stack([-2.0 * ratio[0], 0 * ratio[1], ratio[2], -ratio[3], 0 * ratio[4]])
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- opcheck

def _opcheck_cases(dev):
    v, x, y, v_ref = latents((2, 37), dev, torch.bfloat16, torch.float32, ref=True)
    a, b, std = coeffs(2, dev)
    g, gm = torch.randn(2, device=dev), torch.randn(2, device=dev)
    lp, old, adv, ref = _loss_inputs(6, dev, 0.1, 0.1)
    r = torch.randn(8, 2, device=dev)
    w = torch.tensor([1.0, 0.5], device=dev)
    return {
        "logprob_fwd": (v.requires_grad_(), x.requires_grad_(), y, v_ref, a, b, std, False),
        "logprob_bwd": (g, gm, v.detach(), x.detach(), y, v_ref, a, b, std, True, True, True, False),
        "sample_step": (v.detach(), x.detach(), torch.randn(2, 37, device=dev), a, b, std, False),
        "sample_step_rng": (v.detach(), x.detach(), torch.tensor([7], device=dev), a, b, std, True),
        "group_advantages": (r, w, 4, 0, True, 1e-8, 5.0, False, False),
        "policy_loss_fwd": (lp.requires_grad_(), old, adv, ref, 0.1, 0.1, 0.04, 0),
        "policy_loss_bwd": (torch.randn(6, device=dev), lp.detach(), old, adv, None, 0.1, 0.2, 0.0, 2),
    }


@pytest.mark.parametrize("name", ["logprob_fwd", "logprob_bwd", "sample_step", "sample_step_rng",
                                  "group_advantages", "policy_loss_fwd", "policy_loss_bwd"])
def test_opcheck(ops, dev, name):
    # All four default checks (schema, autograd registration, fake tensor, aot dispatch with
    # dynamic shapes) on tiny inputs: each runs the interpreted kernel a few times.
    torch.library.opcheck(getattr(ops, name), _opcheck_cases(dev)[name])


def test_launchers_reject_bad_input(dev):
    from dancegrpo.kernels.advantages import group_advantages_fwd
    from dancegrpo.kernels.sample_step import sample_step_fwd
    from dancegrpo.kernels.step_logprob import logprob_fwd

    v, x, y, _ = latents((2, 10), dev)
    a, b, std = coeffs(2, dev)
    with pytest.raises(ValueError, match="seed must be a 1-element int64"):
        sample_step_fwd(v, x, None, torch.tensor([1.0], device=dev), a, b, std, False)
    with pytest.raises(ValueError, match="y must have shape"):
        logprob_fwd(v, x, y[:, :5], None, a, b, std, False)
    with pytest.raises(ValueError, match=r"std must have shape \(2,\)"):
        logprob_fwd(v, x, y, None, a, b, std[:1], False)
    with pytest.raises(ValueError, match="group_size must be a positive divisor"):
        group_advantages_fwd(torch.randn(6, 1, device=dev), torch.ones(1, device=dev), 4, 0, True, 1e-8, 5.0,
                             False, False)


# --------------------------------------------------------------------------- in-kernel RNG

def _rng_noise(ops, dev, seed, batch=4, n=4096):
    """The in-kernel noise itself: with a = b = 0 and std = 1, y = 0 + 1 * eps exactly."""
    zeros = torch.zeros(batch, n, device=dev)
    a = torch.zeros(batch, device=dev)
    y, _ = ops.sample_step_rng(zeros, zeros, torch.tensor([seed], device=dev), a, a, a + 1.0, False)
    return y


def test_rng_statistics(ops, dev):
    eps = _rng_noise(ops, dev, 1234).double()
    flat = eps.flatten()
    n = flat.numel()  # 16384 draws; every bound below is 5 standard errors (false alarm < 1e-6)
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert abs(flat.var().item() - 1) < 5 * math.sqrt(2 / n)
    # Shape: Kolmogorov-Smirnov distance to N(0, 1) below the alpha = 1e-3 critical value.
    cdf = torch.special.ndtr(flat.sort().values)
    grid = torch.arange(1, n + 1, dtype=torch.float64, device=flat.device) / n
    ks = torch.maximum((grid - cdf).abs(), (cdf - (grid - 1 / n)).abs()).max().item()
    assert ks < 1.95 / math.sqrt(n)
    # Independence: samples of a batch, neighbouring elements (lanes of one Philox call) and
    # their squares (the Box-Muller pairs share a radius) are uncorrelated.
    corr = torch.corrcoef(eps)
    off_diag = corr[~torch.eye(eps.shape[0], dtype=torch.bool, device=corr.device)]
    assert off_diag.abs().max().item() < 5 / math.sqrt(eps.shape[1])
    for lag in (1, 2, 4):
        for series in (flat, flat * flat):
            c = torch.corrcoef(torch.stack([series[:-lag], series[lag:]]))[0, 1].item()
            assert abs(c) < 5 / math.sqrt(n), (lag, c)


def test_rng_seed_reproducibility(ops, dev):
    first = _rng_noise(ops, dev, 99, batch=2, n=1000)
    assert torch.equal(first, _rng_noise(ops, dev, 99, batch=2, n=1000))
    other = _rng_noise(ops, dev, 100, batch=2, n=1000)
    assert not torch.equal(first, other)
    c = torch.corrcoef(torch.stack([first.flatten(), other.flatten()]))[0, 1].item()
    assert abs(c) < 5 / math.sqrt(2000)
    # A 64-bit seed uses its high word too.
    assert not torch.equal(_rng_noise(ops, dev, 5, 1, 256), _rng_noise(ops, dev, 5 + 2**40, 1, 256))


def test_rng_noise_does_not_depend_on_tiling(ops, dev, monkeypatch):
    from dancegrpo.kernels import _config, sample_step

    before = _rng_noise(ops, dev, 3, batch=3, n=999)
    monkeypatch.setattr(sample_step, "reduce_config", lambda n: _config.ReduceConfig(64, 3, 1))
    assert torch.equal(before, _rng_noise(ops, dev, 3, batch=3, n=999))


def test_public_sample_step_reproducible_from_generator(dev):
    v, x, _, _ = latents((2, 3, 50), dev, torch.bfloat16)
    c = dancegrpo.StepCoeffs(*coeffs(2, dev))
    run = lambda s: dancegrpo.sample_step(v, x, c, generator=torch.Generator(device=dev).manual_seed(s),
                                          backend="triton")
    (y1, lp1), (y2, lp2), (y3, _) = run(0), run(0), run(1)
    assert torch.equal(y1, y2) and torch.equal(lp1, lp2)
    assert not torch.equal(y1, y3)
    # The recorded logp is that of the stored sample.
    torch.testing.assert_close(lp1, dancegrpo.step_logprob(v, x, y1, c, backend="torch"), **FP32_TOL)


# --------------------------------------------------------------------------- determinism

def test_two_calls_bit_identical(ops, dev):
    v, x, y, v_ref = latents((3, 2000), dev, torch.bfloat16, ref=True)
    a, b, std = coeffs(3, dev)
    seed = torch.tensor([11], device=dev)
    lp, old, adv, ref = _loss_inputs(40, dev, 0.1, 0.1)
    r = torch.randn(40, 1, device=dev)
    calls = [
        lambda: ops.logprob_fwd(v, x, y, v_ref, a, b, std, False),
        lambda: ops.logprob_bwd(lp[:3], old[:3], v, x, y, v_ref, a, b, std, False, True, True, True),
        lambda: ops.sample_step_rng(v, x, seed, a, b, std, False),
        lambda: ops.group_advantages(r, torch.ones(1, device=dev), 8, 0, True, 1e-8, 5.0, False, False),
        lambda: ops.policy_loss_fwd(lp, old, adv, ref, 0.1, 0.1, 0.04, 0),
    ]
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)
    for call in calls:
        for p, q in zip(as_tuple(call()), as_tuple(call()), strict=True):
            assert torch.equal(p, q)


def test_rollout_logp_equals_training_logp(ops, dev):
    """The first importance ratio after a rollout must be 1: sample_step's logp and logprob_fwd's
    logp of the stored sample share tiling, arithmetic and combine. Bit-identical under the
    interpreter; on GPU the compiler schedules two different kernels, so within 1 fp32 ulp-ish."""
    for x_dtype in (torch.float32, torch.bfloat16):
        v, x, _, _ = latents((3, 1500), dev, torch.bfloat16, x_dtype)
        a, b, std = coeffs(3, dev)
        y, lp_roll = ops.sample_step_rng(v, x, torch.tensor([5], device=dev), a, b, std, False)
        lp_train, _ = ops.logprob_fwd(v, x, y, None, a, b, std, False)
        if BACKEND.interpreted:
            assert torch.equal(lp_roll, lp_train)
        else:
            torch.testing.assert_close(lp_roll, lp_train, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- no recompilation

class _Recorder:
    """Wraps a kernel: records the arguments of each launch, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _jit_function(kernel):
    """The compiled-mode JITFunction of a kernel (rebuilt, with its options, from an interpreted one)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, (JITFunction, InterpretedFunction)):  # unwrap an Autotuner
        kernel = kernel.fn
    if isinstance(kernel, JITFunction):
        return kernel
    options = ("do_not_specialize", "do_not_specialize_on_alignment")
    return JITFunction(kernel.fn, **{k: v for k, v in kernel.kwargs.items() if k in options})


def _h100_cache_key(kernel, args, kwargs):
    """The cache key Triton's JIT would compute for this launch on an sm_90 GPU. Triton builds it
    from argument types and specialisations (int == 1, 16-divisibility, pointer alignment) and
    constexpr values, without a GPU, so the no-recompile guarantee is checkable on CPU."""
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit, "compute_cache_key"):
        pytest.skip("this Triton version has no create_function_from_signature/compute_cache_key")
    from dancegrpo.kernels._config import ELEMENTWISE_CONFIGS

    function = _jit_function(kernel)
    missing = {k: v for k, v in ELEMENTWISE_CONFIGS[0].kwargs.items() if k not in kwargs}  # autotuned launch
    binder = jit.create_function_from_signature(function.signature, function.params,
                                                make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, options = binder(*args, **kwargs, **missing)
    return jit.compute_cache_key({}, specialization, options)


def test_per_step_scalars_do_not_specialize(dev, monkeypatch):
    from dancegrpo.kernels import advantages, policy_loss, sample_step, step_logprob

    kernels = {
        (step_logprob, "_logprob_fwd_kernel"), (step_logprob, "_logprob_combine_kernel"),
        (step_logprob, "_logprob_bwd_kernel"), (sample_step, "_sample_step_fwd_kernel"),
        (advantages, "_group_advantages_fwd_kernel"), (policy_loss, "_policy_loss_fwd_kernel"),
        (policy_loss, "_policy_loss_bwd_kernel"),
    }
    recorders = {}
    for module, name in kernels:
        recorders[name] = _Recorder(getattr(module, name))
        monkeypatch.setattr(module, name, recorders[name])

    v, x, y, v_ref = latents((2, 320), dev, ref=True)
    r = torch.randn(16, 1, device=dev)
    lp, old, adv, ref = _loss_inputs(16, dev, 0.1, 0.1)
    for eta, clip, beta, eps in ((0.3, 1e-4, 0.0, 1e-8), (0.9, 0.2, 0.04, 1e-6)):
        c = dancegrpo.flow_sde_coeffs(torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), eta)
        a, b, std = c.expand(2, dev)
        torch.ops.dancegrpo_triton.logprob_fwd(v, x, y, v_ref, a, b, std, False)
        torch.ops.dancegrpo_triton.logprob_bwd(lp[:2], old[:2], v, x, y, v_ref, a, b, std, False, True, False, False)
        torch.ops.dancegrpo_triton.sample_step_rng(v, x, torch.tensor([int(eta * 10)], device=dev), a, b, std, False)
        torch.ops.dancegrpo_triton.group_advantages(r, torch.ones(1, device=dev), 4, 0, True, eps, clip * 50, False,
                                                    False)
        torch.ops.dancegrpo_triton.policy_loss_fwd(lp, old, adv, ref, clip, 2 * clip, beta, 0)
        torch.ops.dancegrpo_triton.policy_loss_bwd(torch.tensor(1.0, device=dev), lp, old, adv, ref, clip, 2 * clip,
                                                   beta, 0)
    for name, rec in recorders.items():
        # Both iterations launch the same sequence (the combine kernel serves two ops): launch j of
        # the first iteration and launch j of the second must share one compiled variant.
        half = len(rec.calls) // 2
        assert half >= 1 and len(rec.calls) == 2 * half, name
        for first, second in zip(rec.calls[:half], rec.calls[half:], strict=True):
            assert _h100_cache_key(rec.kernel, *first) == _h100_cache_key(rec.kernel, *second), \
                f"{name} would compile a new variant for new per-step values"
    # The key does see structural changes, so the check above can fail: HAS_REF on vs off.
    fwd = recorders["_logprob_fwd_kernel"]
    args, kwargs = fwd.calls[0]
    assert _h100_cache_key(fwd.kernel, args, dict(kwargs, HAS_REF=False)) != _h100_cache_key(fwd.kernel, args, kwargs)


# --------------------------------------------------------------------------- GPU compilation on CPU

_COMPILE_SCRIPT = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature
from dancegrpo.kernels import advantages, policy_loss, sample_step, step_logprob

launches = []

class Record:  # stands in for a kernel: keeps the launch, runs nothing
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

for module in (advantages, policy_loss, sample_step, step_logprob):
    for name in [n for n in vars(module) if n.endswith("_kernel")]:
        setattr(module, name, Record(getattr(module, name)))

B, N = 2, 16 * 21 * 60 * 104  # the video latent's N: 2048 x 8 tiles with a ragged last one
v, x = torch.randn(B, N).bfloat16(), torch.randn(B, N)
c = torch.ones(B)
step_logprob.logprob_fwd(v, x, x, v, c, c, c, False)
step_logprob.logprob_bwd(c, c, v, x, x, v, c, c, c, True, True, True, True)
step_logprob.logprob_bwd(c, None, v, x, x, None, c, c, c, False, True, False, False)
sample_step.sample_step_fwd(v, x, None, torch.tensor([1]), c, c, c, False)
sample_step.sample_step_fwd(v, x, x, None, c, c, c, False)
r, w = torch.randn(24, 2), torch.ones(2)
for std_mode in range(3):
    advantages.group_advantages_fwd(r, w, 6, std_mode, True, 1e-8, 5.0, std_mode == 1, True)
lp = torch.randn(40)
for reduction in (0, 2):
    policy_loss.policy_loss_fwd(lp, lp, lp, lp, 0.1, 0.2, 0.04, reduction)
    policy_loss.policy_loss_bwd(lp if reduction == 2 else c[0], lp.bfloat16(), lp, lp, lp, 0.1, 0.2, 0.04, reduction)

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
for kernel, args, kwargs in launches:
    jit = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner: its first config
    meta = dict(kernel.configs[0].kwargs, num_warps=kernel.configs[0].num_warps) if jit is not kernel else {}
    kwargs = dict(kwargs, **meta)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    compiled = compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
    assert compiled.asm["cubin"], jit.fn.__name__
    print(jit.fn.__name__, "shared", compiled.metadata.shared)
print("compiled", len(launches))
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs the kernels as Python and forgives what the compiler does not (types
    of loop-carried values, layouts, constexpr misuse). Compile each kernel variant a training step
    launches all the way to an sm_90 cubin (Triton ships ptxas), in a process without
    TRITON_INTERPRET, so a kernel that would not build on an H100 fails here."""
    import triton.runtime.jit as jit

    if not hasattr(jit, "create_function_from_signature"):
        pytest.skip("this Triton version has no create_function_from_signature")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 15" in done.stdout, done.stdout


# --------------------------------------------------------------------------- torch.compile

def test_compiled_training_step_matches_eager(dev):
    """torch.compile(fullgraph=True) of the loss (backend "aot_eager": Inductor would need a C++
    or GPU toolchain for its own code; our ops run as the same Triton kernels either way), then
    backward through the compiled graph. The forward and backward graphs must hold our custom ops
    (no graph break, no fallback to another backend) and match eager exactly."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    recording = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    v0, x, y, v_ref = latents((3, 4, 7, 5), dev, ref=True)
    c = dancegrpo.flow_sde_coeffs(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.8, 0.7, 0.6]), 0.7)
    a, b, std = c.expand(3, dev)
    old = torch.ops.dancegrpo_triton.logprob_fwd(v0, x, y, None, a, b, std, False)[0] - 0.01
    adv = torch.randn(3, device=dev)

    def loss_fn(v):
        loss, stats = dancegrpo.grpo_step_loss(v, x, y, c, old, adv, clip_range=0.2, ref_model_output=v_ref,
                                               beta=0.01, backend="triton")
        return loss, stats["logp"], stats["clip_fraction"]

    def run(fn):
        v = v0.clone().requires_grad_()
        loss, logp, clip_fraction = fn(v)
        loss.backward()
        return loss.detach(), logp, clip_fraction, v.grad

    eager = run(loss_fn)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend=recording))
    assert not counters["graph_break"], dict(counters["graph_break"])
    for e, k in zip(eager, compiled, strict=True):
        assert torch.equal(e, k)
    assert any("dancegrpo_triton.logprob_fwd" in g for g in graphs)
    assert any("dancegrpo_triton.policy_loss_fwd" in g for g in graphs)
    assert any("dancegrpo_triton.logprob_bwd" in g for g in graphs)
    assert any("dancegrpo_triton.policy_loss_bwd" in g for g in graphs)


# --------------------------------------------------------------------------- GPU only

VIDEO = (8, 16, 21, 60, 104)  # the target video latent (bench/): 2.1 M elements per sample


def _compiled_variants(kernel) -> int:
    """Compiled binaries held by a JIT kernel (through an Autotuner) across devices."""
    jit = kernel
    while not hasattr(jit, "device_caches"):
        jit = jit.fn
    return sum(len(cache[0]) for cache in jit.device_caches.values())


@pytest.mark.gpu
def test_gpu_video_latent_parity(ops):
    dev = "cuda"
    if BACKEND.interpreted:
        pytest.skip("runs compiled kernels (TRITON_INTERPRET is set)")
    torch.manual_seed(0)
    v, x, y, v_ref = latents(VIDEO, dev, torch.bfloat16, torch.float32, ref=True)
    a, b, std = coeffs(VIDEO[0], dev)
    logp, msd = ops.logprob_fwd(v, x, y, v_ref, a, b, std, False)
    vd = v.double().requires_grad_()
    ref_logp, ref_msd = R.step_logprob_ref(vd, x.double(), y.double(), a.double(), b.double(), std.double(),
                                           v_ref=v_ref.double())
    torch.testing.assert_close(logp.double(), ref_logp.detach(), **FP32_TOL)
    torch.testing.assert_close(msd.double(), ref_msd.detach(), **FP32_TOL)
    g, gm = torch.randn(VIDEO[0], device=dev), torch.randn(VIDEO[0], device=dev)
    gv, _, _ = ops.logprob_bwd(g, gm, v, x, y, v_ref, a, b, std, False, True, False, False)
    torch.autograd.backward([ref_logp, ref_msd], [g.double(), gm.double()])
    assert_low_precision(gv, vd.grad, "gv")
    del vd, ref_logp, ref_msd
    noise = torch.randn(VIDEO, device=dev)
    ys, lps = ops.sample_step(v, x, noise, a, b, std, False)
    want, _ = R.step_logprob_ref(v.double(), x.double(), ys.double(), a.double(), b.double(), std.double())
    torch.testing.assert_close(lps.double(), want, **FP32_TOL)
    y_rng, lp_rng = ops.sample_step_rng(v, x, torch.tensor([17], device=dev), a, b, std, False)
    eps = ((y_rng.double() - a.double().view(-1, 1, 1, 1, 1) * x.double()
            - b.double().view(-1, 1, 1, 1, 1) * v.double()) / std.double().view(-1, 1, 1, 1, 1))
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / math.sqrt(n) + 1e-6
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / n) + 1e-5
    torch.testing.assert_close(lp_rng, ops.logprob_fwd(v, x, y_rng, None, a, b, std, False)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_64bit_offsets():
    """B * N > 2^31: the second sample starts past int32 range (needs ~13 GB of GPU memory)."""
    if BACKEND.interpreted:
        pytest.skip("runs compiled kernels (TRITON_INTERPRET is set)")
    dev, n = "cuda", (1 << 30) + 37
    ops = torch.ops.dancegrpo_triton
    v = torch.randn(2, n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(2, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(2, n, device=dev, dtype=torch.bfloat16)
    a, b, std = coeffs(2, dev)
    logp, _ = ops.logprob_fwd(v, x, y, None, a, b, std, False)
    want = torch.zeros(2, dtype=torch.float64, device=dev)
    for s in range(2):
        for c0 in range(0, n, 1 << 26):  # fp64 reference in chunks to bound memory
            r = y[s, c0:c0 + (1 << 26)].double() - a[s].double() * x[s, c0:c0 + (1 << 26)].double() \
                - b[s].double() * v[s, c0:c0 + (1 << 26)].double()
            want[s] += (r * r).sum()
    want = -want / (2 * std.double() ** 2 * n) - std.double().log() - R.LOG_SQRT_2PI
    torch.testing.assert_close(logp.double(), want, rtol=1e-5, atol=1e-5)
    gv, _, _ = ops.logprob_bwd(torch.ones(2, device=dev), None, v, x, y, None, a, b, std, False, True, False, False)
    tail = slice(n - 1000, n)
    r = y[1, tail].double() - a[1].double() * x[1, tail].double() - b[1].double() * v[1, tail].double()
    assert_low_precision(gv[1, tail], b[1].double() * r.double() / (std[1].double() ** 2 * n), "gv tail")


@pytest.mark.gpu
def test_gpu_new_per_step_values_do_not_recompile(ops):
    if BACKEND.interpreted:
        pytest.skip("the interpreter has no compile cache")
    from dancegrpo.kernels import policy_loss, sample_step, step_logprob

    dev = "cuda"
    v, x, y, _ = latents((2, 5000), dev, torch.bfloat16)
    lp, old, adv, ref = _loss_inputs(16, dev, 0.1, 0.1)

    def step(eta, clip, beta):
        a, b, std = dancegrpo.flow_sde_coeffs(torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), eta).expand(2, dev)
        ops.logprob_fwd(v, x, y, None, a, b, std, False)
        ops.logprob_bwd(lp[:2], None, v, x, y, None, a, b, std, False, True, False, False)
        ops.sample_step_rng(v, x, torch.tensor([3], device=dev), a, b, std, False)
        ops.policy_loss_fwd(lp, old, adv, ref, clip, clip, beta, 0)

    kernels = (step_logprob._logprob_fwd_kernel, step_logprob._logprob_combine_kernel,
               step_logprob._logprob_bwd_kernel, sample_step._sample_step_fwd_kernel,
               policy_loss._policy_loss_fwd_kernel)
    step(0.3, 1e-4, 0.01)
    torch.cuda.synchronize()
    before = [_compiled_variants(k) for k in kernels]
    for eta, clip, beta in ((0.7, 1e-3, 0.04), (1.1, 0.2, 0.0)):
        step(eta, clip, beta)
    torch.cuda.synchronize()
    assert [_compiled_variants(k) for k in kernels] == before
