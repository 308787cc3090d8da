"""Compiled backends (``native`` C++, ``triton``) against the float64 reference, through the public API.

Every case draws fresh random inputs (the ``seed`` fixture), never zeros, and compares three runs:
the backend under test, the PyTorch reference (``backend="torch"``) on the *same* dtypes, and the
PyTorch reference on float64 copies (the truth). The tolerance tables below say how far from the
truth a backend may be and why. Both compiled backends must be available (``make setup`` builds
native; triton is a dev dependency, interpreted on CPU): a missing one fails with its reason.
"""

from __future__ import annotations

import math

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import get_backend
from dancegrpo.ops import reference as R

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64

# ---- tolerances -------------------------------------------------------------------------------
# Each output is compared with three runs: the backend (out), the PyTorch reference computing in
# fp32 with fp32 outputs (ref32: low-precision inputs upcast, which is what the reference does
# inside, minus the final rounding), and the reference in float64 (r = ref64, the truth).
# Elementwise, with (factor, n, atol) from the table for out's dtype:
#     |out - r| <= factor * |ref32 - r| + n * ulp_out(r) + 4 * ulp_fp32(r) + atol * max|r|
# * factor * |ref32 - r|: flash-attention's rule. The kernels compute in fp32 like the reference
#   (bf16/fp16 inputs, fp32 math), so they inherit the same fp32 error, notably the
#   cancellation in y - (a x + b v) for elements whose residual is tiny; they may be at most 2x worse.
# * n * ulp_out(r): a bf16/fp16 output is an fp32 value rounded once to nearest, so it may be at most
#   half an ulp of its dtype beyond the fp32 value's own error (n = 0.5: truncation would fail);
#   fp32 outputs have no such extra rounding (n = 0).
# * 4 * ulp_fp32(r): the kernel's own few fp32 roundings, done in another order than the reference's.
# * atol * scale: 4 fp32 ulps (2^-22) of the magnitude of the terms the output is made of: by default
#   its largest value (an element carries fp32 roundings of operands that large even where the
#   reference happens to be exact); for sums that cancel or are clipped (log-probs, losses,
#   advantages), the size of the summed terms, which is what bounds any fp32 evaluation's error.
# Forward: logp, losses, statistics, advantages (fp32) and sample_step's next latents (x's dtype).
FWD_TOL = {F32: (2.0, 0.0, 2.0**-22), BF16: (2.0, 0.5, 2.0**-22), F16: (2.0, 0.5, 2.0**-22)}
# Backward: gradients, each in its input's dtype: one fp32 product c * r per element, rounded once.
BWD_TOL = {F32: (2.0, 0.0, 2.0**-22), BF16: (2.0, 0.5, 2.0**-22), F16: (2.0, 0.5, 2.0**-22)}

# ---- cases ------------------------------------------------------------------------------------
# Triton runs interpreted on CPU (TRITON_INTERPRET=1): small shapes only. Native adds shapes that
# span many 4096-element tiles with a ragged last one and cross its parallel threshold (2^16).
SMALL_SHAPES = [(3, 1237), (2, 3, 5, 7)]
SHAPES = {"native": SMALL_SHAPES + [(3, 16, 37, 41), (2, 70001)], "triton": SMALL_SHAPES}
COMPILED = tuple(SHAPES)

DTYPES = {  # (model_output, latents, next_latents)
    "fp32": (F32, F32, F32),
    "bf16": (BF16, BF16, BF16),
    "fp16": (F16, F16, F16),
    "bf16-v_fp32-xy": (BF16, F32, F32),  # the usual training case: bf16 network, fp32 latents
    "fp16-v_bf16-x_fp32-y": (F16, BF16, F32),
}


def _shape_cases():
    return [pytest.param(b, s, id=f"{b}-{'x'.join(map(str, s))}") for b in COMPILED for s in SHAPES[b]]


def _small_cases():
    return [pytest.param(b, SMALL_SHAPES[0], id=b) for b in COMPILED]


def require(name: str) -> None:
    backend = get_backend(name)
    reasons = backend.unavailable_reasons()
    if reasons:
        pytest.fail(f"backend {name!r} unavailable: {'; '.join(reasons)}")
    if "cpu" not in backend.devices:
        pytest.skip(f"backend {name!r} does not run on cpu (devices {backend.devices})")


# ---- helpers ----------------------------------------------------------------------------------

def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |t| (float64 in, float64 out), subnormals included."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp(min=fi.tiny)))) * fi.eps


def assert_close(name, out, ref64, ref32, table, scale=None):
    """The elementwise rule above; ``ref32`` may be None (no fp32 reference error to allow)."""
    out, ref64 = out.detach(), ref64.detach()
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert ref64.dtype == F64
    factor, n, atol = table[out.dtype]
    o, r = out.double(), ref64
    assert torch.isfinite(o).all(), f"{name}: non-finite values where the reference is finite"
    scale = r.abs().max().item() if scale is None else float(scale)
    allowed = n * ulp(r, out.dtype) + 4 * ulp(r, F32) + atol * scale
    if ref32 is not None:
        allowed = allowed + factor * (ref32.detach().double() - r).abs()
    err = (o - r).abs()
    bad = err > allowed
    assert not bad.any(), (
        f"{name} ({out.dtype}): {int(bad.sum())} of {bad.numel()} elements out of tolerance; worst "
        f"error {err.max().item():.3g} (allowed there {allowed.flatten()[err.argmax()].item():.3g}, "
        f"fp32 reference error there {'-' if ref32 is None else f'{(ref32.double() - r).abs().flatten()[err.argmax()].item():.3g}'})")


def logp_scale(lp64: torch.Tensor, coeffs: dg.StepCoeffs, n: int, reduction: str) -> float:
    """Size of the terms of a log-prob: mean(r^2) / (2 std^2) and |log std + log sqrt(2 pi)|, per
    element, times N for the sum; the two have opposite signs and may cancel."""
    norm = coeffs.std.double().log() + 0.5 * math.log(2 * math.pi)
    per_elem = lp64 / (n if reduction == "sum" else 1)
    quad = -(per_elem + norm)  # mean(r^2) / (2 std^2) >= 0
    return float(((quad.abs() + norm.abs()) * (n if reduction == "sum" else 1)).max())


def random_coeffs(batch: int) -> dg.StepCoeffs:
    """DanceGRPO flow steps at random sigmas and etas (std between about 0.01 and 0.25)."""
    sigma = 0.2 + 0.75 * torch.rand(batch, dtype=F64)
    sigma_next = sigma * (0.9 + 0.08 * torch.rand(batch, dtype=F64))
    return dg.flow_sde_coeffs(sigma, sigma_next, 0.2 + 0.6 * torch.rand(batch, dtype=F64))


def arrange(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` with other strides."""
    if layout == "contiguous":
        return t.clone()
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":  # every other element of a wider tensor whose gaps hold NaN
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(layout)


def step_inputs(shape, dtypes, coeffs, layout="contiguous"):
    """(v, x, y) with y drawn from the step's Gaussian (as a rollout stores it), in ``dtypes``."""
    dv, dx, dy = dtypes
    v, x = torch.randn(shape).to(dv), torch.randn(shape).to(dx)
    col = (-1,) + (1,) * (len(shape) - 1)
    mean = coeffs.a.double().view(col) * x.double() + coeffs.b.double().view(col) * v.double()
    y = (mean + coeffs.std.double().view(col) * torch.randn(shape, dtype=F64)).to(dy)
    out = tuple(arrange(t, layout) for t in (v, x, y))
    if layout != "contiguous":
        assert not any(t.is_contiguous() for t in out)
    return out


def log_ratios(n: int, low: float, high: float, margin: float) -> torch.Tensor:
    """log(new/old) values in about [-3 clip, 3 clip], none within ``margin`` (relative to the clip
    range) of a clip boundary, so fp32 rounding cannot flip which branch of the clip is taken."""
    lo, hi = math.log1p(-low), math.log1p(high)
    d = (torch.rand(n, dtype=F64) * 2 - 1) * 3 * max(low, high)
    near = lambda d: ((d - lo).abs() < margin * low) | ((d - hi).abs() < margin * high)  # noqa: E731
    while near(d).any():
        d = torch.where(near(d), (torch.rand(n, dtype=F64) * 2 - 1) * 3 * max(low, high), d)
    return d


def _leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


# ---- step_logprob -----------------------------------------------------------------------------

def _logprob_and_grads(backend, tensors, coeffs, reduction, g_out, dtype=None):
    leaves = _leaves(tensors, dtype)
    logp = dg.step_logprob(*leaves, coeffs, reduction=reduction, backend=backend)
    grads = torch.autograd.grad(logp, leaves, g_out.to(logp.dtype))
    return logp.detach(), grads


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend, shape", _shape_cases())
def test_step_logprob(backend, shape, dtypes, reduction, seed):
    require(backend)
    coeffs = random_coeffs(shape[0])
    tensors = step_inputs(shape, dtypes, coeffs)
    g_out = torch.randn(shape[0])
    lp, grads = _logprob_and_grads(backend, tensors, coeffs, reduction, g_out)
    lp32, grads32 = _logprob_and_grads("torch", tensors, coeffs, reduction, g_out, dtype=F32)
    lp64, grads64 = _logprob_and_grads("torch", tensors, coeffs, reduction, g_out, dtype=F64)
    assert lp.dtype == F32
    n = math.prod(shape[1:])
    assert_close("logp", lp, lp64, lp32, FWD_TOL, scale=logp_scale(lp64, coeffs, n, reduction))
    for name, g, g32, g64, t in zip(("d/dv", "d/dx", "d/dy"), grads, grads32, grads64, tensors, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(name, g, g64, g32, BWD_TOL)
    # Only d/dv requested (the training case): the kernel skips gx/gy and gives the same gv.
    v_only = tensors[0].detach().requires_grad_()
    lp_v = dg.step_logprob(v_only, tensors[1], tensors[2], coeffs, reduction=reduction, backend=backend)
    (gv,) = torch.autograd.grad(lp_v, v_only, g_out)
    assert torch.equal(lp_v.detach(), lp) and torch.equal(gv, grads[0])


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16-v_fp32-xy"])
@pytest.mark.parametrize("backend", COMPILED)
def test_step_logprob_non_contiguous(backend, dtypes, layout, seed):
    require(backend)
    shape = (2, 3, 5, 7)
    coeffs = random_coeffs(shape[0])
    tensors = step_inputs(shape, DTYPES[dtypes], coeffs, layout=layout)
    g_out = torch.randn(shape[0])
    lp, grads = _logprob_and_grads(backend, tensors, coeffs, "mean", g_out)
    lp32, grads32 = _logprob_and_grads("torch", tensors, coeffs, "mean", g_out, dtype=F32)
    lp64, grads64 = _logprob_and_grads("torch", tensors, coeffs, "mean", g_out, dtype=F64)
    assert_close("logp", lp, lp64, lp32, FWD_TOL, scale=logp_scale(lp64, coeffs, math.prod(shape[1:]), "mean"))
    for name, g, g32, g64 in zip(("d/dv", "d/dx", "d/dy"), grads, grads32, grads64, strict=True):
        assert_close(name, g, g64, g32, BWD_TOL)


# ---- sample_step ------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("backend, shape", _shape_cases())
def test_sample_step(backend, shape, dtypes, reduction, seed):
    require(backend)
    coeffs = random_coeffs(shape[0])
    v, x, _ = step_inputs(shape, dtypes, coeffs)
    noise = torch.randn(shape).to(dtypes[2])
    y, lp = dg.sample_step(v, x, coeffs, noise=noise, reduction=reduction, backend=backend)
    y32, _ = dg.sample_step(v.float(), x.float(), coeffs, noise=noise.float(), reduction=reduction,
                            backend="torch")
    y64, _ = dg.sample_step(v.double(), x.double(), coeffs, noise=noise.double(), reduction=reduction,
                            backend="torch")
    assert y.dtype == x.dtype and y.shape == x.shape and lp.dtype == F32
    assert_close("next_latents", y, y64, y32, FWD_TOL)
    # logp is the log-prob of the latents as stored (rounded to x's dtype), not of the fp32 sample.
    lp64 = dg.step_logprob(v.double(), x.double(), y.double(), coeffs, reduction=reduction, backend="torch")
    lp32 = dg.step_logprob(v, x, y, coeffs, reduction=reduction, backend="torch")
    assert_close("logp", lp, lp64, lp32, FWD_TOL, scale=logp_scale(lp64, coeffs, math.prod(shape[1:]), reduction))
    # The first update after a rollout must see a ratio of exactly 1.
    again = dg.step_logprob(v, x, y, coeffs, reduction=reduction, backend=backend)
    assert torch.equal(again, lp), f"step_logprob of the stored sample differs: {(again - lp).abs().max()}"


# ---- group_advantages -------------------------------------------------------------------------

P, G = 4, 6


def _rewards(k: int, drop: bool) -> torch.Tensor:
    """(P*G, k) fp32. Group 1 is constant; with ``drop``: a NaN in one column of sample 3, +inf in
    sample 9 (group 1 stays constant among its valid members), -inf in 14, group 3 all NaN."""
    r = torch.randn(P * G, k)
    r[G:2 * G] = torch.randn(1, k)
    if drop:
        r[3, k - 1] = float("nan")
        r[9, 0] = float("inf")
        r[14, :] = float("-inf")
        r[3 * G:] = float("nan")
    return r


def _advantage_scale(rewards, weights, kw) -> float:
    """sum_k |w_k| max|A_k|: the size of the weighted per-reward advantages (before clipping) that
    the output sums."""
    kw = dict(kw, clip=None, weights=None)
    if rewards.dim() == 1 or kw["aggregate"] == "reward":
        r = rewards if rewards.dim() == 1 else (rewards.double() * weights.double()).sum(1)
        return float(dg.group_advantages(r.double(), G, backend="torch", **kw).abs().max())
    return sum(abs(float(w)) * float(dg.group_advantages(rewards[:, j].double(), G, backend="torch", **kw)
                                     .abs().max()) for j, w in enumerate(weights))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("aggregate", ["advantage", "reward"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("std", ["group", "global", "none"])
@pytest.mark.parametrize("backend", COMPILED)
def test_group_advantages(backend, std, unbiased, aggregate, k, seed):
    require(backend)
    weights = None if k == 1 else torch.tensor([0.5, 1.25, -0.75])
    for drop in (False, True):
        rewards = _rewards(k, drop)
        if k == 1:
            rewards = rewards[:, 0]
        for clip in (None, 5.0, 0.6):
            kw = dict(weights=weights, std=std, unbiased=unbiased, clip=clip, aggregate=aggregate,
                      nan_policy="drop" if drop else "raise")
            out = dg.group_advantages(rewards, G, backend=backend, **kw)
            low = dg.group_advantages(rewards, G, backend="torch", **kw)
            ref = dg.group_advantages(rewards.double(), G, backend="torch", **kw)
            assert out.dtype == F32 and out.shape == (P * G,)
            assert_close(f"advantages (drop={drop}, clip={clip})", out, ref, low, FWD_TOL,
                         scale=_advantage_scale(rewards, weights, kw))
            assert torch.equal(out[G:2 * G], torch.zeros(G)), "a constant group must give exactly 0"
            if drop:
                assert torch.equal(out[[3, 9, 14]], torch.zeros(3)) and torch.equal(out[3 * G:], torch.zeros(G))
            if clip is not None:
                assert out.abs().max() <= clip


# ---- clipped_ratio_loss -----------------------------------------------------------------------

def _loss_and_grad(backend, logp, old, adv, ref, g_out, dtype=None, **kw):
    (leaf,) = _leaves([logp], dtype)
    cast = (lambda t: t if t is None else t.to(dtype)) if dtype else (lambda t: t)
    loss, stats = dg.clipped_ratio_loss(leaf, cast(old), cast(adv), ref_logp=cast(ref), backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, g_out.to(loss.dtype))
    return loss.detach(), stats, grad


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("clip_high", [None, 3e-4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", COMPILED)
def test_clipped_ratio_loss(backend, reduction, clip_high, with_ref, seed):
    require(backend)
    batch, low = 37, 1e-4
    logp = (torch.randn(batch) - 3).float()
    old = (logp.double() - log_ratios(batch, low, clip_high or low, margin=0.05)).float()
    adv = torch.randn(batch)
    ref = (logp + 0.05 * torch.randn(batch)) if with_ref else None
    kw = dict(clip_range=low, clip_range_high=clip_high, beta=0.04 if with_ref else 0.0, reduction=reduction)
    g_out = torch.randn(batch) if reduction == "none" else torch.randn(())
    loss, stats, grad = _loss_and_grad(backend, logp, old, adv, ref, g_out, **kw)
    loss32, stats32, grad32 = _loss_and_grad("torch", logp, old, adv, ref, g_out, **kw)
    loss64, stats64, grad64 = _loss_and_grad("torch", logp, old, adv, ref, g_out, dtype=F64, **kw)
    per64, _ = dg.clipped_ratio_loss(logp.double(), old.double(), adv.double(),
                                     ref_logp=None if ref is None else ref.double(), backend="torch",
                                     **dict(kw, reduction="none"))
    loss_scale = {"mean": per64.abs().mean(), "sum": per64.abs().sum(), "none": per64.abs().max()}[reduction]
    assert_close("loss", loss, loss64, loss32, FWD_TOL, scale=loss_scale)
    assert 0 < stats64["clip_fraction"] < 1, "the inputs should clip some samples and not others"
    assert stats["clip_fraction"].item() == pytest.approx(stats64["clip_fraction"].item(), abs=1e-7)
    for key in ("approx_kl", "ratio_mean"):
        assert_close(key, stats[key], stats64[key], stats32[key], FWD_TOL)
    assert_close("d/dlogp", grad, grad64, grad32, BWD_TOL)


# ---- grpo_step_loss ---------------------------------------------------------------------------

def _grpo(backend, tensors, v_ref, coeffs, old, adv, beta):
    leaves = _leaves(tensors)
    loss, stats = dg.grpo_step_loss(*leaves, coeffs, old, adv, clip_range=1e-4, clip_range_high=2e-4,
                                    ref_model_output=v_ref, beta=beta, backend=backend)
    return loss.detach(), stats, torch.autograd.grad(loss, leaves)


def _grpo_reference(tensors, v_ref, coeffs, old, adv, beta, logp_at, dtype, monkeypatch):
    """``reference.grpo_step_loss_ref`` (the op's readable spec) in ``dtype``, with the clipped
    loss evaluated at ``logp_at``, the backend's own log-probs.

    The loss, its statistics and the gradient's per-sample factor depend on logp through
    exp(logp - old) with log-ratios near 1e-4, so an fp32-level difference in logp (checked on its
    own) would dominate their comparison; evaluating the reference at the same logp checks each
    stage against float64 given its input. The gradient still flows through the reference logp.
    """
    leaves = _leaves(tensors, dtype)
    exact = R.step_logprob_ref

    def at_backend_logp(*args, **kw):
        lp, msd = exact(*args, **kw)
        return lp + (logp_at.to(lp.dtype) - lp).detach(), msd

    with monkeypatch.context() as m:
        m.setattr(R, "step_logprob_ref", at_backend_logp)
        loss, stats = R.grpo_step_loss_ref(*leaves, coeffs.a, coeffs.b, coeffs.std, old.to(dtype), adv.to(dtype),
                                           clip_low=1e-4, clip_high=2e-4,
                                           v_ref=None if v_ref is None else v_ref.to(dtype), beta=beta)
    return loss.detach(), stats, torch.autograd.grad(loss, leaves)


def _grpo_cases():
    """Every dtype mix on the small shapes; the large native shapes (each many torch reference ops
    on 10^5 elements) only for the two mixes training uses, to keep the suite fast."""
    out = []
    for param in _shape_cases():
        backend, shape = param.values
        small = shape in SMALL_SHAPES
        for dtypes in ("fp32", "bf16", "bf16-v_fp32-xy", "fp16"):
            if small or dtypes in ("fp32", "bf16-v_fp32-xy"):
                out.append(pytest.param(backend, shape, dtypes, id=f"{param.id}-{dtypes}"))
    return out


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("backend, shape, dtypes", _grpo_cases())
def test_grpo_step_loss(backend, shape, dtypes, with_ref, seed, monkeypatch):
    require(backend)
    batch = shape[0]
    coeffs = random_coeffs(batch)
    tensors = step_inputs(shape, DTYPES[dtypes], coeffs)
    v_ref = (tensors[0].float() + 0.1 * torch.randn(shape)).to(tensors[0].dtype) if with_ref else None
    beta = 0.02 if with_ref else 0.0
    # Old log-probs a clip range or so away from the exact new ones, never near a clip boundary.
    lp64 = dg.step_logprob(*(t.double() for t in tensors), coeffs, backend="torch")
    lp32 = dg.step_logprob(*(t.float() for t in tensors), coeffs, backend="torch")
    old = (lp64 - log_ratios(batch, 1e-4, 2e-4, margin=0.15)).float()
    adv = torch.randn(batch)
    loss, stats, grads = _grpo(backend, tensors, v_ref, coeffs, old, adv, beta)
    assert set(stats) == {"clip_fraction", "approx_kl", "ratio_mean", "logp"} | ({"kl"} if with_ref else set())
    assert_close("logp", stats["logp"], lp64, lp32, FWD_TOL, scale=logp_scale(lp64, coeffs, math.prod(shape[1:]), "mean"))
    loss32, stats32, grads32 = _grpo_reference(tensors, v_ref, coeffs, old, adv, beta, stats["logp"], F32, monkeypatch)
    loss64, stats64, grads64 = _grpo_reference(tensors, v_ref, coeffs, old, adv, beta, stats["logp"], F64, monkeypatch)
    # The loss averages terms of size |A| ratio (ratio ~ 1) plus beta * KL.
    scale = adv.abs().mean().item() + beta * (stats64["kl"].item() if with_ref else 0.0)
    assert_close("loss", loss, loss64, loss32, FWD_TOL, scale=scale)
    assert stats["clip_fraction"].item() == pytest.approx(stats64["clip_fraction"].item(), abs=1e-7)
    for key in ("approx_kl", "ratio_mean") + (("kl",) if with_ref else ()):
        assert_close(key, stats[key], stats64[key], stats32[key], FWD_TOL)
    for name, g, g32, g64 in zip(("d/dv", "d/dx", "d/dy"), grads, grads32, grads64, strict=True):
        assert_close(name, g, g64, g32, BWD_TOL)


# ---- determinism and fully written outputs ----------------------------------------------------

@pytest.mark.parametrize("backend", COMPILED)
def test_bit_identical_across_calls_and_thread_counts(backend, seed):
    require(backend)
    shape = SHAPES[backend][-1]
    coeffs = random_coeffs(shape[0])
    tensors = step_inputs(shape, DTYPES["bf16-v_fp32-xy"], coeffs)
    noise = torch.randn(shape)

    def run():
        lp, grads = _logprob_and_grads(backend, tensors, coeffs, "mean", torch.ones(shape[0]))
        y, lp_s = dg.sample_step(tensors[0], tensors[1], coeffs, noise=noise, backend=backend)
        return (lp, *grads, y, lp_s)

    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b), "two identical calls differ"
        assert torch.equal(a, c), f"1 thread differs from {threads} threads"


@pytest.mark.parametrize("backend", COMPILED)
def test_raw_ops_write_every_element(backend, seed):
    """Outputs are fully written: a freed output poisoned with NaN (the allocator usually hands the
    same memory to the next call) never shows through, and every output is finite."""
    require(backend)
    ops = getattr(torch.ops, get_backend(backend).namespace)
    shape, batch = SMALL_SHAPES[0], SMALL_SHAPES[0][0]
    coeffs = random_coeffs(batch)
    v, x, y = step_inputs(shape, DTYPES["bf16-v_fp32-xy"], coeffs)
    v_ref = (v.float() + 0.1 * torch.randn(shape)).to(v.dtype)
    a, b, std = coeffs.expand(batch, v.device)
    g, gm = torch.randn(batch), torch.randn(batch)
    logp = torch.randn(batch) - 3
    old = logp + 1e-4 * torch.randn(batch)
    adv, rewards = torch.randn(batch), torch.randn(6, 2)
    calls = {
        "logprob_fwd": lambda: ops.logprob_fwd(v, x, y, v_ref, a, b, std, False),
        "logprob_bwd": lambda: ops.logprob_bwd(g, gm, v, x, y, v_ref, a, b, std, False, True, True, True),
        "sample_step": lambda: ops.sample_step(v, x, torch.ones_like(x), a, b, std, True),
        "group_advantages": lambda: (ops.group_advantages(rewards, torch.ones(2), 3, 0, True, 1e-8, 5.0,
                                                          False, False),),
        "policy_loss_fwd": lambda: ops.policy_loss_fwd(logp, old, adv, logp + 0.1, 1e-4, 1e-4, 0.01, 2),
        "policy_loss_bwd": lambda: (ops.policy_loss_bwd(g, logp, old, adv, None, 1e-4, 1e-4, 0.0, 2),),
    }
    for name, call in calls.items():
        first = call()
        expected = [t.clone() for t in first]
        for t in first:
            t.fill_(float("nan"))
        del first
        for _ in range(2):
            again = call()
            for t, e in zip(again, expected, strict=True):
                assert torch.isfinite(t).all(), f"{name}: an output element was not written"
                assert torch.equal(t, e), f"{name}: results differ between calls"
            for t in again:
                t.fill_(float("nan"))
            del again
