"""GRPO-Guard's ratio normalisation (``grpo_step_loss(..., ratio_norm=True)``) against a
readable formula written here, on every backend."""

import math

import pytest
import torch

import dancegrpo as dg
from dancegrpo.coeffs import StepCoeffs
from dancegrpo.ops import reference as R
from dancegrpo.ops.dispatch import availability


def readable(v, x, y, a, b, std, v_old, old_logp, adv, clip):
    """The normalised ratio in float64, from the definition: with the Gaussian step
    N(a x + b v, std^2), log r = logp(v) - old_logp;  r_norm = exp(std log r + mean((m - m_old)^2) / (2 std)),
    then PPO's clipped objective averaged over the batch."""
    v, x, y, v_old = (t.double().flatten(1) for t in (v, x, y, v_old))
    a, b, std = (t.double()[:, None] for t in (a, b, std))
    m, m_old = a * x + b * v, a * x + b * v_old
    logp = (-(y - m) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).mean(1)
    log_r = std[:, 0] * (logp - old_logp.double()) + ((m - m_old) ** 2).mean(1) / (2 * std[:, 0])
    r = torch.exp(log_r)
    adv = adv.double()
    per = torch.maximum(-adv * r, -adv * r.clamp(1 - clip, 1 + clip))
    return per.mean(), r


def inputs(batch=4, shape=(3, 5, 6), gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    a = 1 + 0.05 * torch.rand(batch, generator=g)
    b = -(0.05 + 0.1 * torch.rand(batch, generator=g))
    std = 0.02 + 0.2 * torch.rand(batch, generator=g)
    x = torch.randn(batch, *shape, generator=g)
    v_old = torch.randn(batch, *shape, generator=g)
    eps = torch.randn(batch, *shape, generator=g)
    y = a.view(-1, 1, 1, 1) * x + b.view(-1, 1, 1, 1) * v_old + std.view(-1, 1, 1, 1) * eps
    coeffs = StepCoeffs(a, b, std)
    old = dg.step_logprob(v_old.double(), x.double(), y.double(), coeffs, backend="torch").float()
    v = v_old + 0.3 * torch.randn(batch, *shape, generator=g)  # the policy after some updates
    adv = torch.randn(batch, generator=g)
    return v, x, y, coeffs, v_old, old, adv, eps


def _backends():
    avail = availability("cpu")
    return [pytest.param(n, marks=pytest.mark.skipif(bool(avail[n]), reason="; ".join(avail[n]) or "-"))
            for n in ("torch", "native", "triton")]


@pytest.mark.parametrize("backend", _backends())
def test_ratio_norm_loss_and_gradient_match_the_formula(backend):
    v, x, y, coeffs, v_old, old, adv, _ = inputs()
    clip = 0.2
    vv = v.clone().requires_grad_(True)
    loss, stats = dg.grpo_step_loss(vv, x, y, coeffs, old, adv, clip_range=clip, ratio_norm=True,
                                    old_model_output=v_old, backend=backend)
    loss.backward()
    v64 = v.double().requires_grad_(True)
    want, r = readable(v64, x, y, coeffs.a, coeffs.b, coeffs.std, v_old, old, adv, clip)
    want.backward()
    tol = dict(rtol=1e-5, atol=1e-6)  # fp32 inputs: a few fp32 roundings of O(1) terms
    torch.testing.assert_close(loss.double(), want.detach(), **tol)
    torch.testing.assert_close(stats["ratio_mean"].double(), r.mean().detach(), **tol)
    torch.testing.assert_close(vv.grad.double(), v64.grad, rtol=1e-4, atol=1e-7)
    # the plain loss is another number: the option is not a no-op
    plain, _ = dg.grpo_step_loss(v, x, y, coeffs, old, adv, clip_range=clip, backend=backend)
    assert abs(float(plain.detach()) - float(loss.detach())) > 1e-3


def test_normalised_log_ratio_has_no_shift_and_one_scale():
    """For y = m_old + std eps the normalised log-ratio is mean(eps (m - m_old)): no negative
    -mean(dm^2) / (2 std^2) term, and no 1 / std factor (the per-timestep normalisation)."""
    v, x, y, coeffs, v_old, old, adv, eps = inputs(gen_seed=1)
    _, r = readable(v, x, y, coeffs.a, coeffs.b, coeffs.std, v_old, old, adv, 0.2)
    dm = coeffs.b.double().view(-1, 1) * (v - v_old).double().flatten(1)
    torch.testing.assert_close(torch.log(r), (eps.double().flatten(1) * dm).mean(1), rtol=1e-5, atol=1e-6)


def test_reference_op_matches_the_formula():
    v, x, y, coeffs, v_old, old, adv, _ = inputs(gen_seed=2)
    loss, stats = R.grpo_step_loss_ref(v.double(), x.double(), y.double(), coeffs.a, coeffs.b, coeffs.std, old, adv,
                                       clip_low=0.1, clip_high=0.1, ratio_norm=True, v_old=v_old.double())
    want, r = readable(v, x, y, coeffs.a, coeffs.b, coeffs.std, v_old, old, adv, 0.1)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["ratio_mean"], r.mean(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", _backends())
def test_ratio_is_exactly_one_at_the_rollout_weights(backend):
    v, x, y, coeffs, v_old, old, adv, _ = inputs(gen_seed=3)
    old = dg.step_logprob(v_old, x, y, coeffs, backend=backend)  # the rollout's own log-prob
    _, stats = dg.grpo_step_loss(v_old.clone(), x, y, coeffs, old, adv, ratio_norm=True, old_model_output=v_old,
                                 backend=backend)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)


def test_ratio_norm_user_errors_are_one_line():
    v, x, y, coeffs, v_old, old, adv, _ = inputs()
    with pytest.raises(ValueError, match="ratio_norm=True needs old_model_output"):
        dg.grpo_step_loss(v, x, y, coeffs, old, adv, ratio_norm=True)
    mse = StepCoeffs(coeffs.a, coeffs.b, coeffs.std, "mse")
    with pytest.raises(ValueError, match="Gaussian log-ratio"):
        dg.grpo_step_loss(v, x, y, mse, old, adv, ratio_norm=True, old_model_output=v_old)
