"""The deterministic step (``ode_step``) and Flow-GRPO's CPS log-prob convention (``logprob="mse"``)."""

import math

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import get_backend
from dancegrpo.ops import reference as R

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


def _backends():
    """torch plus every compiled backend that runs on this CPU."""
    out = ["torch"]
    for name in ("native", "triton"):
        b = get_backend(name)
        if not b.unavailable_reasons() and "cpu" in b.devices:
            out.append(name)
    return out


def _col(t, like):
    return t.double().view(-1, *([1] * (like.dim() - 1)))


# ---- ode_step -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dance", "flow_grpo", "cps"])
def test_eta_zero_is_the_euler_step_in_every_variant(variant, seed):
    sigma = torch.tensor([0.9, 0.5, 0.2], dtype=F64)
    nxt = torch.tensor([0.8, 0.3, 0.0], dtype=F64)
    c = dg.flow_sde_coeffs(sigma, nxt, 0.0, variant=variant)
    assert torch.equal(c.std, torch.zeros(3))
    x, v = torch.randn(3, 4, 5, dtype=F64), torch.randn(3, 4, 5, dtype=F64)
    y = dg.ode_step(v, x, c)
    assert y.dtype == F64
    torch.testing.assert_close(y, x + _col(nxt - sigma, x) * v, rtol=1e-6, atol=1e-7)


def test_ode_step_is_deterministic_ddim(seed):
    ab, ab_prev = torch.tensor([0.3, 0.6]), torch.tensor([0.5, 0.9])
    c = dg.ddim_coeffs(ab, ab_prev, 0.0)
    x, eps = torch.randn(2, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    x0 = (x - _col((1 - ab).sqrt(), x) * eps) / _col(ab.sqrt(), x)
    expected = _col(ab_prev.sqrt(), x) * x0 + _col((1 - ab_prev).sqrt(), x) * eps
    torch.testing.assert_close(dg.ode_step(eps, x, c), expected, rtol=1e-6, atol=1e-6)


def test_ode_step_dtypes_and_gradient(seed):
    c = dg.StepCoeffs(torch.rand(2) + 0.5, torch.randn(2), torch.zeros(2))
    v, x = torch.randn(2, 3, 7).to(BF16), torch.randn(2, 3, 7).to(BF16)
    y = dg.ode_step(v, x, c)
    # fp32 math, one rounding to latents' dtype
    want = (c.a.view(-1, 1, 1) * x.float() + c.b.view(-1, 1, 1) * v.float()).to(BF16)
    assert y.dtype == BF16 and torch.equal(y, want)
    assert dg.ode_step(v, x.float(), c).dtype == F32  # the result takes latents' dtype
    # scalar coefficients broadcast over the batch; non-contiguous inputs are fine
    s = dg.StepCoeffs(torch.tensor(1.0), torch.tensor(-0.25), torch.tensor(0.0))
    xt = torch.randn(2, 7, 3).transpose(1, 2)
    torch.testing.assert_close(dg.ode_step(xt, xt, s), 0.75 * xt)
    # differentiable in model_output (and latents): d y / d v = b
    vg = torch.randn(2, 5, requires_grad=True)
    dg.ode_step(vg, torch.randn(2, 5), c).sum().backward()
    torch.testing.assert_close(vg.grad, c.b.view(-1, 1).expand(2, 5))


def test_sampler_ode_step_uses_it(seed):
    from dancegrpo.samplers import FlowSampler

    s = FlowSampler(5, shift=3.0, eta=0.7)
    x, v = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64)
    for i in range(5):
        assert torch.equal(s.ode_step(i, x, v), dg.ode_step(v, x, s.ode_coeffs(i)))


def test_ode_step_bad_input():
    c = dg.StepCoeffs(torch.ones(2), torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="ode_step: latents has shape"):
        dg.ode_step(torch.randn(2, 3), torch.randn(2, 4), c)
    with pytest.raises(TypeError, match="ode_step: coeffs must be a StepCoeffs"):
        dg.ode_step(torch.randn(2, 3), torch.randn(2, 3), (1.0, 2.0))
    with pytest.raises(ValueError, match="coeffs.a has 2 values but the batch has B=3"):
        dg.ode_step(torch.randn(3, 3), torch.randn(3, 3), c)


# ---- Flow-GRPO's CPS log-prob convention ------------------------------------------------------

def _flow_grpo_cps(v, x, y, sigma, sigma_next, eta):
    """Flow-GRPO's CPS step and log-prob, as its code writes them (float64): the mean from the x0
    and x1 predictions, and -(y - mean)^2 averaged over every non-batch dimension."""
    s, sn = _col(sigma, x), _col(sigma_next, x)
    std = sn * math.sin(eta * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    mean = x0 * (1 - sn) + x1 * (sn ** 2 - std ** 2).sqrt()
    return -((y - mean) ** 2).mean(dim=tuple(range(1, x.dim()))), mean


def _cps_case(shape=(3, 4, 6, 5), eta=0.7):
    sigma = torch.tensor([0.95, 0.6, 0.25], dtype=F64)[: shape[0]]
    nxt = sigma - torch.tensor([0.05, 0.1, 0.2], dtype=F64)[: shape[0]]
    c = dg.flow_sde_coeffs(sigma, nxt, eta, variant="cps", logprob="mse")
    v, x = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    y = R.sample_step_ref(v, x, torch.randn(shape, dtype=F64), c.a, c.b, c.std)[0]
    return sigma, nxt, eta, c, v, x, y


def test_mse_reference_is_flow_grpo_formula(seed):
    sigma, nxt, eta, c, v, x, y = _cps_case()
    want, _ = _flow_grpo_cps(v, x, y, sigma, nxt, eta)
    got, _ = R.step_logprob_ref(v, x, y, c.a, c.b, c.std, logprob="mse")
    # the coefficients are stored in fp32, so the means agree to fp32 precision of (a, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", _backends())
def test_step_logprob_mse_values_and_gradients(backend, seed):
    _, _, _, c, v, x, y = _cps_case()
    n = v[0].numel()
    for reduction in ("mean", "sum"):
        v32 = v.float().requires_grad_()
        lp = dg.step_logprob(v32, x.float(), y.float(), c, reduction=reduction, backend=backend)
        v64 = v.clone().requires_grad_()
        want = R.step_logprob_ref(v64, x, y, c.a, c.b, c.std, reduction=reduction, logprob="mse")[0]
        # fp32: the log-prob is -mean((y - m)^2) (about 0.1 here) up to a few fp32 roundings of
        # terms of size log sqrt(2 pi) ~ 0.92 (times N for the sum)
        scale = 1.0 if reduction == "mean" else n
        torch.testing.assert_close(lp.double(), want, rtol=0, atol=16 * 2**-24 * scale)
        g = torch.randn(3)
        (gv,) = torch.autograd.grad(lp, v32, g.float())
        (gv64,) = torch.autograd.grad(want, v64, g.double())
        # closed form: d/dv of -mean((y - a x - b v)^2) = 2 b (y - mean) / N (sum: without 1/N)
        mean = _col(c.a, x) * x + _col(c.b, x) * v
        closed = _col(g, x) * 2 * _col(c.b, x) * (y - mean) / (n if reduction == "mean" else 1)
        torch.testing.assert_close(gv64, closed, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gv.double(), closed, rtol=1e-4, atol=1e-6)


def test_mse_fp64_is_exact_on_the_torch_backend(seed):
    sigma, nxt, eta, c, v, x, y = _cps_case()
    lp = dg.step_logprob(v, x, y, c, backend="torch")
    torch.testing.assert_close(lp, R.step_logprob_ref(v, x, y, c.a, c.b, c.std, logprob="mse")[0],
                               rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("backend", _backends())
def test_sample_step_mse_logp_is_that_of_the_stored_sample(backend, seed):
    _, _, _, c, v, x, _ = _cps_case()
    gauss = dg.StepCoeffs(c.a, c.b, c.std)
    noise = torch.randn(v.shape)
    for dtype in (F32, BF16):
        vv, xx = v.to(dtype), x.to(dtype)
        y, lp = dg.sample_step(vv, xx, c, noise=noise, backend=backend)
        y_g, lp_g = dg.sample_step(vv, xx, gauss, noise=noise, backend=backend)
        assert torch.equal(y, y_g), "the noise has the step's real std under either convention"
        assert torch.equal(lp, dg.step_logprob(vv, xx, y, c, backend=backend)), "ratio 1 on the first update"
        assert not torch.allclose(lp, lp_g)


def test_grpo_step_loss_mse_against_reference(seed):
    sigma, nxt, eta, c, v, x, y = _cps_case()
    v_ref = v + 0.05 * torch.randn_like(v)
    lp = R.step_logprob_ref(v, x, y, c.a, c.b, c.std, logprob="mse")[0]
    old = lp + 1e-3 * torch.randn(3, dtype=F64)
    adv = torch.randn(3, dtype=F64)
    kw = dict(clip_range=0.5, ref_model_output=v_ref, beta=0.1)
    leaf = v.clone().requires_grad_()
    loss, stats = dg.grpo_step_loss(leaf, x, y, c, old, adv, backend="torch", **kw)
    leaf_ref = v.clone().requires_grad_()
    want, want_stats = R.grpo_step_loss_ref(leaf_ref, x, y, c.a, c.b, c.std, old, adv, clip_low=0.5, clip_high=0.5,
                                            v_ref=v_ref, beta=0.1, logprob="mse")
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    for key in want_stats:
        torch.testing.assert_close(stats[key], want_stats[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(want, leaf_ref)[0],
                               rtol=1e-10, atol=1e-14)
    # the KL is the exact Gaussian KL of the step (its real std), whatever the log-prob convention
    _, gauss_stats = dg.grpo_step_loss(v, x, y, dg.StepCoeffs(c.a, c.b, c.std), old, adv, backend="torch", **kw)
    torch.testing.assert_close(stats["kl"], gauss_stats["kl"], rtol=1e-14, atol=0)
    # and the log-prob the loss uses is Flow-GRPO's
    torch.testing.assert_close(stats["logp"], _flow_grpo_cps(v, x, y, sigma, nxt, eta)[0], rtol=1e-5, atol=1e-6)


def test_logprob_convention_travels_with_the_coeffs():
    c = dg.flow_sde_coeffs(torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), 0.7, variant="cps", logprob="mse")
    assert c.logprob == "mse" and c[1:].logprob == "mse" and c.to("cpu").logprob == "mse"
    from dancegrpo.samplers import FlowSampler, build_sampler

    s = FlowSampler(4, shift=3.0, eta=0.7, variant="cps", logprob="mse")
    assert s.coeffs(1, 3).logprob == "mse" and s.ode_coeffs(1).logprob == "gaussian"
    assert dg.flow_sde_coeffs(0.9, 0.8, 0.7).logprob == "gaussian"
    with pytest.raises(ValueError, match="logprob must be one of"):
        dg.flow_sde_coeffs(0.9, 0.8, 0.7, logprob="cps")
    with pytest.raises(ValueError, match="StepCoeffs.logprob must be one of"):
        dg.StepCoeffs(torch.ones(1), torch.ones(1), torch.ones(1), "gauss")
    with pytest.raises(ValueError, match="ddim sampler uses the Gaussian"):
        build_sampler("ddim", num_steps=4, eta=1.0, logprob="mse")
