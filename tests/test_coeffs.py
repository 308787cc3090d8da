"""The coefficient builders reproduce each sampler's step written out the way its authors write it."""

import math

import pytest
import torch

import dancegrpo as dg


def _step(coeffs, x, v):
    shape = (-1,) + (1,) * (x.dim() - 1)
    return coeffs.a.double().view(shape) * x + coeffs.b.double().view(shape) * v, coeffs.std.double()


@pytest.fixture
def xv(seed):
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    v = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    return x, v


SIGMAS = torch.tensor([1.0, 0.9, 0.5, 0.12], dtype=torch.float64)
NEXT = torch.tensor([0.9, 0.75, 0.3, 0.0], dtype=torch.float64)


def test_dance_matches_danceGRPO_sde_step(xv):
    """DanceGRPO's flux step: Euler step plus -0.5 eta^2 score dsigma, std = eta sqrt(-dsigma)."""
    x, v = xv
    eta = 0.3
    c = dg.flow_sde_coeffs(SIGMAS, NEXT, eta)
    mean, std = _step(c, x, v)
    s = SIGMAS.view(-1, 1, 1, 1)
    dsigma = NEXT.view(-1, 1, 1, 1) - s
    x0 = x - s * v
    score = -(x - x0 * (1 - s)) / s**2
    expected = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, eta * torch.sqrt(SIGMAS - NEXT), rtol=1e-6, atol=1e-7)


def test_flow_grpo_matches_its_sde_step(xv):
    x, v = xv
    eta, sigma_max = 0.7, 0.9
    c = dg.flow_sde_coeffs(SIGMAS, NEXT, eta, variant="flow_grpo", sigma_max=sigma_max)
    mean, std = _step(c, x, v)
    s = SIGMAS.view(-1, 1, 1, 1)
    dt = NEXT.view(-1, 1, 1, 1) - s
    std_t = torch.sqrt(s / (1 - torch.where(s == 1, torch.tensor(sigma_max, dtype=s.dtype), s))) * eta
    expected = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, (std_t * torch.sqrt(-dt)).flatten(), rtol=1e-6, atol=1e-7)


def test_flow_grpo_needs_sigma_max_at_one():
    with pytest.raises(ValueError, match="sigma_max"):
        dg.flow_sde_coeffs(1.0, 0.9, 0.7, variant="flow_grpo")


def test_cps_matches_its_definition(xv):
    x, v = xv
    eta = 0.5
    c = dg.flow_sde_coeffs(SIGMAS, NEXT, eta, variant="cps")
    mean, std = _step(c, x, v)
    s, sn = SIGMAS.view(-1, 1, 1, 1), NEXT.view(-1, 1, 1, 1)
    std_e = sn * math.sin(eta * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    expected = (1 - sn) * x0 + torch.sqrt(sn**2 - std_e**2) * x1
    torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, std_e.flatten(), rtol=1e-6, atol=1e-7)


def test_ode_limit_is_euler(xv):
    x, v = xv
    c = dg.flow_sde_coeffs(SIGMAS, NEXT, 0.0)
    mean, std = _step(c, x, v)
    torch.testing.assert_close(mean, x + (NEXT - SIGMAS).view(-1, 1, 1, 1) * v, rtol=1e-6, atol=1e-6)
    assert torch.all(std == 0)
    with pytest.raises(ValueError, match="std must be > 0"):
        dg.step_logprob(v.float(), x.float(), x.float(), c)


def test_ddim_matches_its_step(xv):
    """DDIM with eta written as x0 prediction, sigma_t, and the direction towards x_t."""
    x, eps = xv
    ab = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    abp = torch.tensor([0.1, 0.5, 0.9, 0.9991], dtype=torch.float64)
    eta = 1.0
    c = dg.ddim_coeffs(ab, abp, eta)
    mean, std = _step(c, x, eps)
    a, ap = ab.view(-1, 1, 1, 1), abp.view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    variance = (1 - ap) / (1 - a) * (1 - a / ap)
    sigma_t = eta * variance.sqrt()
    expected = ap.sqrt() * x0 + (1 - ap - sigma_t**2).sqrt() * eps
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std, sigma_t.flatten(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["dance", "flow_grpo", "cps"])
def test_logprob_of_sampled_step_is_gaussian_density(variant, seed):
    x = torch.randn(3, 4, 7, 9)
    v = torch.randn(3, 4, 7, 9)
    c = dg.flow_sde_coeffs(torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1]), 0.8,
                           variant=variant, sigma_max=0.95)
    y, logp = dg.sample_step(v, x, c, backend="torch")
    mean, std = _step(c, x.double(), v.double())
    dist = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1))
    expected = dist.log_prob(y.double()).flatten(1).mean(1)
    torch.testing.assert_close(logp.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg.step_logprob(v, x, y, c, backend="torch"), logp, rtol=0, atol=0)


def test_flow_schedule_shift():
    s = dg.flow_schedule(4, shift=3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(s, 3 * t / (1 + 2 * t))
    assert s[0] == 1 and s[-1] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma=1.2, sigma_next=0.5, eta=0.3), "sigma must lie"),
        (dict(sigma=0.5, sigma_next=0.6, eta=0.3), "sigma_next"),
        (dict(sigma=0.5, sigma_next=0.4, eta=-1.0), "eta"),
        (dict(sigma="a", sigma_next=0.4, eta=0.1), "sigma must be a float"),
    ],
)
def test_flow_coeffs_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dg.flow_sde_coeffs(**kwargs)


def test_stepcoeffs_validation():
    with pytest.raises(ValueError, match="std must be >= 0"):
        dg.StepCoeffs(torch.ones(2), torch.ones(2), torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="finite"):
        dg.StepCoeffs(torch.tensor([1.0, float("nan")]), torch.ones(2), torch.ones(2))
    c = dg.StepCoeffs(torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="B=4"):
        c.expand(4, torch.device("cpu"))
    assert c[torch.tensor([0, 2])].a.shape == (2,)
    with pytest.raises(ValueError, match="alpha_bar"):
        dg.ddim_coeffs(1.5, 0.5, 1.0)
