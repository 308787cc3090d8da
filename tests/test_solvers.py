"""The deterministic tail of a flow rollout: DPM-Solver++(2M) and MixGRPO-Flash compression.

The ODE is the rectified flow of a Gaussian data distribution N(mu, s^2), whose velocity and
exact solution are closed-form: x_sigma = m(sigma) + sd(sigma) / sd(1) (x_1 - m(1)) with
m = (1 - sigma) mu and sd^2 = (1 - sigma)^2 s^2 + sigma^2.
"""

import math

import pytest
import torch

from dancegrpo.samplers import FlowSampler, build_sampler, dpmpp_2m_coeffs
from dancegrpo.trainer.rollout import collect_rollout

MU, S = 1.5, 0.4


def velocity(x, sigma):
    """E[eps - x0 | x_sigma] for data N(MU, S^2): affine in x."""
    m, var = (1 - sigma) * MU, (1 - sigma) ** 2 * S ** 2 + sigma ** 2
    return -MU + (sigma - (1 - sigma) * S ** 2) / var * (x - m)


def exact(x1, sigma):
    sd = lambda s: math.sqrt((1 - s) ** 2 * S ** 2 + s ** 2)
    return (1 - sigma) * MU + sd(sigma) / sd(1.0) * (x1 - 0.0)


def reference_dpmpp_2m(x, sigmas):
    """DPM-Solver++(2M) as written in Lu et al. 2022 (Alg. 2), data prediction, alpha = 1 - sigma.
    Step 1 and the step to sigma = 0 are first order."""
    lam = lambda s: math.log((1 - s) / s) if 0 < s < 1 else (-math.inf if s >= 1 else math.inf)
    x0_prev = None
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        x0 = x - s * velocity(x, s)
        if t == 0:
            x = x0  # alpha_t = 1, sigma_t = 0
        else:
            h = lam(t) - lam(s)
            if x0_prev is None or math.isinf(lam(sigmas[i - 1])):
                d = x0
            else:
                r = (lam(s) - lam(sigmas[i - 1])) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (t / s) * x - (1 - t) * (math.exp(-h) - 1) * d
        x0_prev = x0
    return x


def run_tail(solver, n, shift=1.0, x1=None):
    sampler = FlowSampler(n, shift=shift, eta=0.0, solver=solver)
    x = torch.tensor([0.7, -1.2, 2.0], dtype=torch.float64) if x1 is None else x1
    sig = sampler.sigmas
    calls = []

    def predict(x, t):
        # the model sees fp32 timesteps 1000 sigma; the exact sigma is the grid's nearest one
        s = float(sig[(1000 * sig - float(t[0])).abs().argmin()])
        calls.append(s)
        return velocity(x, s)

    states, x0, m = sampler.integrate_tail(0, x, predict, compress=False)
    assert m == n == len(calls)
    assert all(abs(c - float(a)) < 1e-6 for c, a in zip(calls, sig[:-1]))
    return states[-1], x


def test_dpmpp_2m_matches_the_readable_reference():
    for n, shift in ((6, 1.0), (10, 3.0)):
        out, x1 = run_tail("dpmpp_2m", n, shift)
        sig = FlowSampler(n, shift=shift).sigmas.tolist()
        ref = torch.tensor([reference_dpmpp_2m(float(v), sig) for v in x1], dtype=torch.float64)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_first_order_coefficients_are_the_euler_step():
    for s, t in ((1.0, 0.8), (0.6, 0.3), (0.2, 0.0)):
        cx, c0, c1 = dpmpp_2m_coeffs(s, t)
        # Euler: y = x + (t - s) v with v = (x - x0) / s  ->  y = (t / s) x + (1 - t / s) x0
        assert (cx, c1) == pytest.approx((t / s, 0.0)) and c0 == pytest.approx(1 - t / s)


def _interior_error(n, second_order, a=0.9, b=0.1, x1=0.7):
    """Integrate sigma = a -> b on a uniform grid from the exact state; |error| at b."""
    sig = [a + (b - a) * k / n for k in range(n + 1)]
    x, prev = exact(x1, a), None
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        x0 = x - s * velocity(x, s)
        cx, c0, c1 = dpmpp_2m_coeffs(s, t, prev[1] if (prev is not None and second_order) else None)
        x = cx * x + c0 * x0 + (c1 * prev[0] if c1 else 0.0)
        prev = (x0, s)
    return abs(x - exact(x1, b))


def test_dpmpp_2m_is_second_order_and_euler_first_order():
    ns = (16, 32, 64, 128)
    rate = lambda e: [math.log2(e[k] / e[k + 1]) for k in range(len(e) - 1)]
    euler = rate([_interior_error(n, False) for n in ns])
    dpm = rate([_interior_error(n, True) for n in ns])
    assert all(0.9 < r < 1.1 for r in euler), euler
    assert all(r > 1.75 for r in dpm) and dpm[-1] > 1.9, dpm


def test_full_trajectory_beats_euler():
    """Over the whole trajectory (sigma 1 -> 0, shift 3) the error is far below Euler's. (The
    order degrades near the ends, where a uniform sigma grid takes O(1) steps in lambda.)"""
    for n in (32, 64, 128):
        errs = {}
        for solver in ("euler", "dpmpp_2m"):
            out, x1 = run_tail(solver, n, shift=3.0)
            truth = torch.tensor([exact(float(v), 0.0) for v in x1], dtype=torch.float64)
            errs[solver] = float((out - truth).abs().max())
        assert errs["dpmpp_2m"] < errs["euler"] / 3, (n, errs)


def test_compressed_tail_grid_follows_mixgrpo_flash():
    sampler = FlowSampler(25, shift=3.0, solver="dpmpp_2m", post_compress=0.4)
    sig, ts, pos = sampler.tail_grid(4)  # window ending at step 3: 21 steps left
    assert sig.numel() - 1 == 7  # int(0.4 * 22) = 8 points
    torch.testing.assert_close(sig[0], sampler.sigmas[4])
    assert float(sig[-1]) == 0.0 and bool((sig[1:] < sig[:-1]).all())
    torch.testing.assert_close(sig, sampler.sigmas[4::3])  # 21 / 7 = 3: the grid's own points
    torch.testing.assert_close(ts, (1000 * sig[:-1]).float())
    full, _, _ = sampler.tail_grid(4, compress=False)
    assert full.numel() - 1 == 21


def test_solver_values_are_checked():
    with pytest.raises(ValueError, match="solver must be one of"):
        FlowSampler(4, solver="rk4")
    with pytest.raises(ValueError, match="post_compress must lie in"):
        FlowSampler(4, post_compress=0.0)
    with pytest.raises(ValueError, match="need a flow sampler"):
        build_sampler("ddim", num_steps=4, eta=1.0, solver="dpmpp_2m")


class GaussianModel:
    """A 'policy' whose velocity is the Gaussian flow's (prompts ignored)."""

    prediction = "velocity"
    training = False

    def latent_shape(self):
        return (2, 3)

    def encode_prompts(self, texts):
        return {"c": torch.zeros(len(texts), 1)}

    def predict(self, x, t, cond):
        return velocity(x, t.view(-1, 1, 1) / 1000.0)

    def decode(self, x):
        return x


class Item:
    text = "p"
    image = None


def _rollout(sampler, mask, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return collect_rollout(GaussianModel(), sampler, [Item(), Item()], 3, mask, gen, device="cpu")


def _tail_error(r, sampler, k):
    """|sample - the exact ODE endpoint| from the rollout's state at grid point k."""
    s = float(sampler.sigmas[k])
    sd = lambda s: math.sqrt((1 - s) ** 2 * S ** 2 + s ** 2)
    x = r.latents[:, k].double()
    return float((r.samples.double() - (MU + S / sd(s) * (x - (1 - s) * MU))).abs().max())


def test_window_steps_are_unchanged_and_the_tail_costs_fewer_calls():
    n, window = 24, torch.zeros(24, dtype=torch.bool)
    window[2:5] = True
    runs = {}
    for solver, compress in (("euler", 1.0), ("dpmpp_2m", 1.0), ("dpmpp_2m", 0.4)):
        sampler = FlowSampler(n, eta=0.7, variant="flow_grpo", solver=solver, post_compress=compress)
        runs[solver, compress] = (_rollout(sampler, window), sampler)
    euler, _ = runs["euler", 1.0]
    for r, _ in runs.values():
        # everything up to the window's last next latent, and every log-prob, is bit-identical
        torch.testing.assert_close(r.latents[:, :6], euler.latents[:, :6], rtol=0, atol=0)
        torch.testing.assert_close(r.log_probs, euler.log_probs, rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isfinite(euler.log_probs[:, 2:5]).all()) and bool(torch.isnan(euler.log_probs[:, 5:]).all())
    assert euler.nfe == runs["dpmpp_2m", 1.0][0].nfe == 24 * 6
    flash, sampler = runs["dpmpp_2m", 0.4]
    tail = max(1, int(0.4 * (24 - 5 + 1)) - 1)  # 19 steps after the window -> 7
    assert flash.nfe == (5 + tail) * 6
    err = {key: _tail_error(r, s, 5) for key, (r, s) in runs.items()}
    assert err["dpmpp_2m", 1.0] < err["euler", 1.0] / 3, err
    assert err["dpmpp_2m", 0.4] < err["euler", 1.0], err  # 7 higher-order calls beat 19 Euler calls
    # grid points the compressed tail skips hold its latest state; the last one is the final sample
    torch.testing.assert_close(flash.latents[:, -1], flash.samples, rtol=0, atol=1e-6)


def test_without_sde_steps_the_whole_trajectory_is_the_tail_uncompressed():
    n = 10
    sampler = FlowSampler(n, eta=0.0, solver="dpmpp_2m", post_compress=0.4)
    r = _rollout(sampler, torch.zeros(n, dtype=torch.bool))
    assert r.nfe == n * 6 and bool(torch.isnan(r.log_probs).all())
    assert _tail_error(r, sampler, 0) < _tail_error(_rollout(FlowSampler(n, eta=0.0), torch.zeros(n, dtype=torch.bool)),
                                                     sampler, 0) / 3
