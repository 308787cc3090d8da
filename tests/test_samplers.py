"""Samplers: schedule, coefficients, ODE limit, x0 predictions, exact-marginal checks."""

import math

import pytest
import torch

from dancegrpo import ddim_coeffs, flow_schedule, flow_sde_coeffs, sample_step
from dancegrpo.samplers import DDIMSampler, FlowSampler, build_sampler, scaled_linear_alphas_cumprod


def test_flow_schedule_and_timesteps():
    s = FlowSampler(10, shift=3.0, eta=0.3)
    assert torch.equal(s.sigmas, flow_schedule(10, 3.0))
    assert float(s.model_timesteps(0)) == pytest.approx(1000.0)
    assert float(s.model_timesteps(4)) == pytest.approx(1000 * float(s.sigmas[4]), rel=1e-6)
    t = s.model_timesteps(torch.tensor([0, 3, 9]))
    assert t.shape == (3,) and t.dtype == torch.float32
    assert s.model_timesteps(2, batch=5).shape == (5,)


@pytest.mark.parametrize("variant", ["dance", "flow_grpo", "cps"])
def test_flow_coeffs_match_builder(variant):
    s = FlowSampler(8, shift=2.0, eta=0.7, variant=variant)
    for i in range(8):
        sig, nxt = s.sigmas[i], s.sigmas[i + 1]
        ref = flow_sde_coeffs(sig, nxt, 0.7, variant=variant,
                              sigma_max=float(s.sigmas[1]) if variant == "flow_grpo" else None)
        c = s.coeffs(i, batch=3)
        assert c.a.shape == (3,)
        for name in ("a", "b", "std"):
            assert torch.allclose(getattr(c, name), getattr(ref, name).expand(3)), (variant, i, name)
    # per-sample steps: one coefficient row per sample
    c = s.coeffs(torch.tensor([0, 5, 2]))
    assert torch.allclose(c.b, torch.stack([s.coeffs(0).b, s.coeffs(5).b, s.coeffs(2).b]).flatten())


def test_flow_ode_step_and_eta_limit(seed):
    s = FlowSampler(6, shift=3.0, eta=1e-6)
    ode = FlowSampler(6, shift=3.0, eta=0.0)
    x, v = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    for i in range(6):
        d = float(s.sigmas[i + 1] - s.sigmas[i])
        assert torch.allclose(s.ode_step(i, x, v), x + d * v, atol=1e-6)
        # eta -> 0: the SDE coefficients tend to the ODE ones (a -> 1, b -> d, std -> 0)
        c, o = s.coeffs(i), s.ode_coeffs(i)
        assert torch.allclose(c.a, o.a, atol=1e-5) and torch.allclose(c.b, o.b, atol=1e-5)
        assert float(c.std.max()) < 1e-5
        assert not ode.is_stochastic(i) and s.is_stochastic(i)


def test_flow_ode_integrates_straight_path_exactly(seed):
    """With the exact velocity of a straight path (v = eps - x0), Euler lands on x0 and every
    x0 prediction along the way is exact."""
    s = FlowSampler(7, shift=3.0, eta=0.0)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x = eps.clone()
    for i in range(7):
        v = eps - x0
        assert torch.allclose(s.x0(i, x, v), x0, atol=1e-5)
        x = s.ode_step(i, x, v)
    assert torch.allclose(x, x0, atol=1e-5)


def test_cps_step_preserves_the_marginal(seed):
    """CPS with exact predictions keeps x_sigma ~ N((1 - sigma) x0, sigma^2) exactly."""
    s = FlowSampler(4, shift=1.0, eta=0.8, variant="cps")
    i = 1
    sig, nxt = float(s.sigmas[i]), float(s.sigmas[i + 1])
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    eps = torch.randn(n, 1)
    x = (1 - sig) * x0 + sig * eps
    v = eps - x0
    y, _ = sample_step(v, x, s.coeffs(i, n), generator=torch.Generator().manual_seed(seed + 1))  # not the global stream
    assert float(y.mean()) == pytest.approx((1 - nxt) * 0.7, abs=5e-3)
    assert float(y.std()) == pytest.approx(nxt, rel=1e-2)
    assert not s.is_stochastic(3)  # sigma' = 0 at the last step: std 0, an ODE step


def test_flow_grpo_at_sigma_one_uses_next_sigma():
    s = FlowSampler(5, eta=0.7, variant="flow_grpo")
    c = s.coeffs(0)
    g = 0.7 * math.sqrt(1.0 / (1 - float(s.sigmas[1])))
    assert float(c.std) == pytest.approx(g * math.sqrt(float(s.sigmas[0] - s.sigmas[1])), rel=1e-5)


def test_ddim_timesteps_coeffs_and_x0(seed):
    ab = scaled_linear_alphas_cumprod()
    s = DDIMSampler(ab, num_steps=50, eta=1.0)
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1 and len(s.timesteps) == 50
    assert float(s.model_timesteps(0)) == 981.0
    # the last step goes below t = 0: alpha-bar_prev is the final alpha (alpha-bar[0])
    assert float(s.ab_prev[-1]) == pytest.approx(float(ab[0]))
    for i in (0, 17, 49):
        ref = ddim_coeffs(ab[s.timesteps[i]], s.ab_prev[i], 1.0)
        c = s.coeffs(i, 2)
        assert torch.allclose(c.a, ref.a.expand(2)) and torch.allclose(c.std, ref.std.expand(2))
    # x0 from the usual formula, and the marginal is preserved exactly with exact eps
    i = 10
    abt, abp = float(s.ab_t[i]), float(s.ab_prev[i])
    n = 200_000
    x0, eps = torch.full((n, 1), -0.4), torch.randn(n, 1)
    x = math.sqrt(abt) * x0 + math.sqrt(1 - abt) * eps
    assert torch.allclose(s.x0(i, x, eps), x0, atol=1e-4)
    y, _ = sample_step(eps, x, s.coeffs(i, n), generator=torch.Generator().manual_seed(seed + 1))  # not the global stream
    # y = sqrt(ab') x0 + sqrt(1 - ab') z with z ~ N(0, 1): its sample mean has standard error
    # sqrt(1 - ab') / sqrt(n); allow 5 standard errors (a 2.5-SE bound failed about 1 run in 80).
    assert float(y.mean()) == pytest.approx(math.sqrt(abp) * -0.4, abs=5 * math.sqrt(1 - abp) / math.sqrt(n))
    assert float(y.std()) == pytest.approx(math.sqrt(1 - abp), rel=1e-2)
    # eta = 0 is deterministic DDIM: y = sqrt(ab') x0_hat + sqrt(1 - ab') eps
    y0 = s.ode_step(i, x[:10], eps[:10])
    assert torch.allclose(y0, math.sqrt(abp) * x0[:10] + math.sqrt(1 - abp) * eps[:10], atol=1e-4)


def test_build_sampler_and_errors():
    class Eps:
        prediction = "epsilon"

    class Vel:
        prediction = "velocity"

    assert isinstance(build_sampler("auto", Vel(), num_steps=4, eta=0.3), FlowSampler)
    assert isinstance(build_sampler("auto", Eps(), num_steps=4, eta=1.0), DDIMSampler)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        build_sampler("flow", Eps(), num_steps=4, eta=0.3)
    with pytest.raises(ValueError, match="num_steps"):
        FlowSampler(0)
    with pytest.raises(ValueError, match="variant"):
        FlowSampler(4, variant="bogus")
    with pytest.raises(ValueError, match="eta"):
        FlowSampler(4, eta=-1.0)
    with pytest.raises(ValueError, match=r"step index must lie in \[0, 4\)"):
        FlowSampler(4).coeffs(4)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DDIMSampler(torch.tensor([0.5, 0.9]), 2)
