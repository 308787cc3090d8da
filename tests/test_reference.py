"""The PyTorch reference: gradients (gradcheck in float64, closed forms) and the advantage/loss formulas."""

import math

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import reference as R

F64 = dict(dtype=torch.float64)


def _coeffs(batch):
    return dg.StepCoeffs(torch.rand(batch) + 0.5, torch.randn(batch), torch.rand(batch) * 0.5 + 0.1)


def test_gradcheck_step_logprob(seed):
    B = 3
    v, x, y = (torch.randn(B, 2, 5, **F64, requires_grad=True) for _ in range(3))
    c = _coeffs(B)
    for reduction in ("mean", "sum"):
        f = lambda v, x, y: dg.step_logprob(v, x, y, c, reduction=reduction, backend="torch")
        assert torch.autograd.gradcheck(f, (v, x, y))


def test_logprob_gradient_closed_form(seed):
    B, N = 3, 40
    v = torch.randn(B, N, **F64, requires_grad=True)
    x, y = torch.randn(B, N, **F64), torch.randn(B, N, **F64)
    c = _coeffs(B)
    dg.step_logprob(v, x, y, c, backend="torch").sum().backward()
    a, b, s = (t.double()[:, None] for t in (c.a, c.b, c.std))
    r = y - (a * x + b * v.detach())
    torch.testing.assert_close(v.grad, b * r / (s**2 * N))


def test_gradcheck_grpo_step_loss(seed):
    B = 4
    v = torch.randn(B, 3, 4, **F64, requires_grad=True)
    x, y, v_ref = (torch.randn(B, 3, 4, **F64) for _ in range(3))
    c = _coeffs(B)
    with torch.no_grad():
        lp = dg.step_logprob(v, x, y, c, backend="torch")
    # old_logp well inside the clip range so the surrogate is smooth at the checked point
    old = lp + 1e-3 * torch.randn(B, **F64)
    adv = torch.randn(B, **F64)
    f = lambda v: dg.grpo_step_loss(v, x, y, c, old, adv, clip_range=0.5, ref_model_output=v_ref, beta=0.1,
                                    backend="torch")[0]
    assert torch.autograd.gradcheck(f, (v,))
    g = lambda v: R.grpo_step_loss_ref(v, x, y, c.a, c.b, c.std, old, adv, clip_low=0.5, clip_high=0.5, v_ref=v_ref,
                                       beta=0.1)[0]
    torch.testing.assert_close(f(v), g(v), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("with_ref", [False, True])
def test_grpo_step_loss_is_its_reference(with_ref, seed):
    """grpo_step_loss (float64, torch backend) against grpo_step_loss_ref: loss, every statistic and
    the gradients, with asymmetric clipping and ratios on both sides of the clip range."""
    B = 6
    v = torch.randn(B, 2, 3, 4, **F64)
    x, y = torch.randn(B, 2, 3, 4, **F64), torch.randn(B, 2, 3, 4, **F64)
    v_ref = v + 0.1 * torch.randn_like(v) if with_ref else None
    c = _coeffs(B)
    lp = R.step_logprob_ref(v, x, y, c.a, c.b, c.std)[0]
    old = lp - torch.tensor([0.3, -0.3, 0.05, -0.05, 0.15, -0.01], **F64)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7, -2.0, 0.3], **F64)
    kw = dict(clip_range=0.1, clip_range_high=0.2, ref_model_output=v_ref, beta=0.05 if with_ref else 0.0)
    leaf, leaf_ref = v.clone().requires_grad_(), v.clone().requires_grad_()
    loss, stats = dg.grpo_step_loss(leaf, x, y, c, old, adv, backend="torch", **kw)
    want, want_stats = R.grpo_step_loss_ref(leaf_ref, x, y, c.a, c.b, c.std, old, adv, clip_low=0.1, clip_high=0.2,
                                            v_ref=v_ref, beta=kw["beta"])
    assert set(stats) == set(want_stats) == {"clip_fraction", "approx_kl", "ratio_mean", "logp"} | (
        {"kl"} if with_ref else set())
    assert 0 < want_stats["clip_fraction"] < 1
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    for key in want_stats:
        torch.testing.assert_close(stats[key], want_stats[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], torch.autograd.grad(want, leaf_ref)[0],
                               rtol=1e-10, atol=1e-14)


def test_grpo_step_loss_ref_kl_is_the_gaussian_kl(seed):
    """The reference's KL is KL(N(mean_theta, std^2) || N(mean_ref, std^2)) per element, averaged."""
    B = 3
    v, x, y = (torch.randn(B, 10, **F64) for _ in range(3))
    v_ref = v + 0.2 * torch.randn_like(v)
    c = _coeffs(B)
    _, stats = R.grpo_step_loss_ref(v, x, y, c.a, c.b, c.std, torch.zeros(B, **F64), torch.zeros(B, **F64),
                                    v_ref=v_ref)
    a, b, s = (t.double()[:, None] for t in (c.a, c.b, c.std))
    normal = torch.distributions.Normal
    kl = torch.distributions.kl_divergence(normal(a * x + b * v, s.expand(B, 10)), normal(a * x + b * v_ref, s.expand(B, 10)))
    torch.testing.assert_close(stats["kl"], kl.mean(1).mean())


def test_gradcheck_clipped_ratio_loss(seed):
    B = 6
    logp = torch.randn(B, **F64, requires_grad=True)
    old = (logp + torch.tensor([0.05, -0.05, 0.3, -0.3, 0.01, -0.2], **F64)).detach()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7, 2.0, 0.3], **F64)
    ref = torch.randn(B, **F64)
    f = lambda lp: dg.clipped_ratio_loss(lp, old, adv, clip_range=0.1, clip_range_high=0.2, ref_logp=ref,
                                         beta=0.05, backend="torch")[0]
    assert torch.autograd.gradcheck(f, (logp,))


def test_clipped_loss_values_and_stats():
    logp = torch.tensor([0.0, 0.0, 0.0, 0.0], **F64)
    old = torch.tensor([-0.2, 0.2, -0.2, 0.2], **F64)  # ratios e^0.2, e^-0.2, e^0.2, e^-0.2
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], **F64)
    loss, stats = dg.clipped_ratio_loss(logp, old, adv, clip_range=0.1, reduction="none", backend="torch")
    r_hi, r_lo = math.exp(0.2), math.exp(-0.2)
    expected = torch.tensor([max(-r_hi, -1.1), max(-r_lo, -0.9), max(r_hi, 1.1), max(r_lo, 0.9)], **F64)
    torch.testing.assert_close(loss, expected)
    assert stats["clip_fraction"].item() == 1.0
    torch.testing.assert_close(stats["approx_kl"].item(), 0.5 * 0.04)
    torch.testing.assert_close(stats["ratio_mean"].item(), (2 * r_hi + 2 * r_lo) / 4)


def test_k3_kl_term():
    logp = torch.tensor([0.1, -0.3], **F64)
    ref = torch.tensor([0.4, -0.2], **F64)
    adv = torch.zeros(2, **F64)
    loss, _ = dg.clipped_ratio_loss(logp, logp, adv, ref_logp=ref, beta=0.5, backend="torch")
    d = ref - logp
    torch.testing.assert_close(loss, 0.5 * (torch.exp(d) - d - 1).mean())


def test_group_advantages_danceGRPO_formula(seed):
    r = torch.randn(12, **F64)
    adv = dg.group_advantages(r, 4, clip=None, backend="torch")
    g = r.view(3, 4)
    expected = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-8)).flatten()
    torch.testing.assert_close(adv, expected)


def test_group_advantages_options(seed):
    r = torch.randn(8, 2, **F64) * 3
    w = torch.tensor([0.7, 0.3], **F64)
    g = r.view(2, 4, 2)
    centred = g - g.mean(1, keepdim=True)
    # population std, global
    adv = dg.group_advantages(r, 4, weights=w, std="global", unbiased=False, clip=None, backend="torch")
    expected = (centred / (r.std(0, unbiased=False) + 1e-8) * w).sum(-1).flatten()
    torch.testing.assert_close(adv, expected)
    # Dr.GRPO: no division
    adv = dg.group_advantages(r, 4, weights=w, std="none", clip=None, backend="torch")
    torch.testing.assert_close(adv, (centred * w).sum(-1).flatten())
    # reward aggregation normalises the weighted sum
    adv = dg.group_advantages(r, 4, weights=w, aggregate="reward", clip=None, backend="torch")
    s = (r * w).sum(1).view(2, 4)
    torch.testing.assert_close(adv, ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + 1e-8)).flatten())
    # clipping
    adv = dg.group_advantages(torch.tensor([0.0, 0, 0, 100.0, 1, 2, 3, 4]), 4, std="none", clip=5.0, backend="torch")
    assert adv.abs().max().item() == 5.0


def test_group_advantages_constant_group_and_drop():
    r = torch.tensor([0.1, 0.1, 0.1, 0.3, 0.5, float("nan")])
    with pytest.raises(ValueError, match="non-finite.*\\[5\\]"):
        dg.group_advantages(r, 3, backend="torch")
    adv = dg.group_advantages(r, 3, nan_policy="drop", backend="torch")
    assert torch.equal(adv[:3], torch.zeros(3))  # constant group: exactly 0, not 1e-9
    assert adv[5].item() == 0.0
    g = torch.tensor([0.3, 0.5], dtype=torch.float64)
    expected = (g - g.mean()) / (g.std() + 1e-8)
    torch.testing.assert_close(adv[3:5].double(), expected, rtol=1e-6, atol=1e-6)
    # a group with a single valid member has advantage 0
    adv = dg.group_advantages(torch.tensor([1.0, float("inf"), float("nan")]), 3, nan_policy="drop", backend="torch")
    assert torch.equal(adv, torch.zeros(3))
