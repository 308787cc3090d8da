"""``nft_loss`` (DiffusionNFT's objective): the reference against the paper's formula written out
here, every backend against the float64 reference (values and gradients, odd shapes, strides,
dtypes), the raw ops (opcheck), torch.compile and the argument checks."""

from __future__ import annotations

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import get_backend
from dancegrpo.ops import reference as R

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
SHAPES = {"torch": [(3, 1237), (2, 3, 5, 7)], "native": [(3, 1237), (2, 3, 5, 7), (2, 70001), (3, 4, 37, 41)],
          "triton": [(3, 1237), (2, 3, 5, 7), (2, 2300)]}  # 2300: 9 tiles, two combine iterations


def _require(name):
    b = get_backend(name)
    if b.unavailable_reasons():
        pytest.fail(f"backend {name!r} unavailable: {'; '.join(b.unavailable_reasons())}")


def _inputs(shape, dtype=F32, old_dtype=None, layout="contiguous"):
    """v, v_old near v (as during training), target, r in [0, 1] with the ends, t in (0, 1)."""
    b = shape[0]
    v = torch.randn(shape, dtype=F64)
    v_old = v + 0.3 * torch.randn(shape, dtype=F64)
    target = torch.randn(shape, dtype=F64)
    r = torch.rand(b, dtype=F64)
    r[0] = 1.0
    if b > 2:
        r[-1] = 0.0
    t = 0.05 + 0.9 * torch.rand(b, dtype=F64)
    cast = lambda x, d: _arrange(x.to(d), layout)
    return cast(v, dtype), cast(v_old, old_dtype or dtype), cast(target, F32), r.float(), t.float()


def _arrange(x, layout):
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    wide = torch.full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"), dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def paper_loss(v, v_old, target, r, t, beta, weighting):
    """DiffusionNFT's loss as its reference training script writes it, in float64: x_t is built,
    x0 predictions are formed from x_t, and the errors are measured against x0."""
    v, v_old, target, r, t = (z.double() for z in (v, v_old, target, r, t))
    col = (-1,) + (1,) * (v.dim() - 1)
    dims = tuple(range(1, v.dim()))
    x0 = torch.randn_like(v)                    # any clean sample: the loss depends on x0 - x_t only
    eps = target + x0                           # target = eps - x0
    xt = (1 - t.view(col)) * x0 + t.view(col) * eps
    pos = beta * v + (1 - beta) * v_old
    neg = (1.0 + beta) * v_old - beta * v
    if weighting == "adaptive":
        x0_pos, x0_neg = xt - t.view(col) * pos, xt - t.view(col) * neg
        w_pos = (x0_pos - x0).abs().mean(dims, keepdim=True).clip(min=1e-5).detach()
        w_neg = (x0_neg - x0).abs().mean(dims, keepdim=True).clip(min=1e-5).detach()
        l_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dims)
        l_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dims)
    else:
        l_pos = ((pos - target) ** 2).mean(dims)
        l_neg = ((neg - target) ** 2).mean(dims)
    return (r * l_pos / beta + (1 - r) * l_neg / beta).mean()


@pytest.mark.parametrize("weighting", ["adaptive", "none"])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_reference_is_the_papers_loss(weighting, beta, seed):
    v, v_old, target, r, t = _inputs((4, 3, 8, 8), F64)
    v.requires_grad_()
    loss, stats = dg.nft_loss(v, v_old, target, r, t, beta=beta, weighting=weighting, backend="torch")
    (g,) = torch.autograd.grad(loss, v)
    vp = v.detach().clone().requires_grad_()
    expected = paper_loss(vp, v_old, target, r, t, beta, weighting)
    (ge,) = torch.autograd.grad(expected, vp)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(g, ge, rtol=1e-9, atol=1e-14)
    assert stats["old_deviation"] > 0


def test_positive_sample_pulls_the_policy_toward_the_target(seed):
    """r = 1 descends toward v = target (beta-scaled); r = 0 pushes v away (the negative policy
    (1 + beta) v_old - beta v approaches the target instead)."""
    v, v_old, target, _, t = _inputs((2, 64))
    for r_val, closer in ((1.0, True), (0.0, False)):
        vv = v.clone().requires_grad_()
        r = torch.full((2,), r_val)
        loss, _ = dg.nft_loss(vv, v_old, target, r, t, beta=1.0, weighting="none", backend="torch")
        (g,) = torch.autograd.grad(loss, vv)
        moved = v - 0.1 * g
        before = (v - target).pow(2).sum()
        after = (moved - target).pow(2).sum()
        assert (after < before) == closer


def _run(backend, v, v_old, target, r, t, beta, weighting, g_out):
    v = v.detach().clone().requires_grad_()
    loss, stats = dg.nft_loss(v, v_old, target, r, t, beta=beta, weighting=weighting, backend=backend)
    (g,) = torch.autograd.grad(loss, v, g_out)
    return loss, stats, g


def _ulp(t, dtype):
    """Spacing of ``dtype`` at |t| (float64), subnormals included."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(t.abs().clamp(min=fi.tiny)))) * fi.eps


def _check_backend(backend, shape, dtype, old_dtype, layout, beta, weighting):
    v, v_old, target, r, t = _inputs(shape, dtype, old_dtype, layout)
    g_out = torch.tensor(1.7)
    loss, stats, g = _run(backend, v, v_old, target, r, t, beta, weighting, g_out)
    up = lambda z: z.double()
    loss64, stats64, g64 = _run("torch", up(v), up(v_old), up(target), r.double(), t.double(), beta, weighting,
                                g_out.double())
    # Loss and statistics: fp32 means of N squares on both sides, summed in another order.
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-5, atol=0)
    for k in stats:
        torch.testing.assert_close(stats[k].double(), stats64[k], rtol=2e-5, atol=1e-7)
    # Gradient: at most twice the fp32 reference's own error on the same dtypes, plus the one
    # rounding into v's dtype (half an ulp, subnormals included: fp16 gradients of large samples
    # are ~1/N), a few fp32 ulps and 2^-22 of the largest value.
    assert g.dtype == v.dtype and g.shape == v.shape
    _, _, g32 = _run("torch", v, v_old, target, r, t, beta, weighting, g_out)
    allowed = (2 * (g32.double() - g64).abs() + 0.5 * _ulp(g64, dtype) + 4 * _ulp(g64, F32)
               + 2.0**-22 * float(g64.abs().max()))
    err = (g.double() - g64).abs()
    assert (err <= allowed).all(), f"{int((err > allowed).sum())} gradient elements off; worst {float(err.max()):.3g}"


def _cases():
    return [pytest.param(b, s, id=f"{b}-{'x'.join(map(str, s))}") for b in SHAPES for s in SHAPES[b]]


@pytest.mark.parametrize("weighting", ["adaptive", "none"])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32)],
                         ids=["fp32", "bf16", "fp16", "bf16-old_fp32"])
@pytest.mark.parametrize("backend, shape", _cases())
def test_backend_matches_float64_reference(backend, shape, dtypes, weighting, seed):
    _require(backend)
    _check_backend(backend, shape, dtypes[0], dtypes[1], "contiguous", 0.7, weighting)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", list(SHAPES))
def test_backend_non_contiguous(backend, layout, seed):
    _require(backend)
    _check_backend(backend, (3, 5, 7), BF16, F32, layout, 1.0, "adaptive")


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_compiled_op_parts_match_the_reference(backend, seed):
    """parts = [L+, L-, w+, w-, msd]: the compiled op's per-sample outputs match the reference's."""
    _require(backend)
    v, v_old, target, r, t = _inputs((3, 2000))
    ops = getattr(torch.ops, get_backend(backend).namespace)
    get_backend(backend).not_supported_reasons("nft_loss", (v,))  # loads the backend
    per, parts = ops.nft_loss_fwd(v, v_old, target, r, t, 0.5, 1e-5, True)
    per64, parts64 = R.nft_loss_ref(v.double(), v_old.double(), target.double(), r.double(), t.double(), beta=0.5)
    torch.testing.assert_close(per.double(), per64, rtol=2e-5, atol=0)
    torch.testing.assert_close(parts.double(), parts64, rtol=2e-5, atol=0)


def test_adaptive_weight_floor(seed):
    """A sample whose implicit policies already hit the target: w is floored at eps, no NaN."""
    v = torch.randn(2, 50)
    target = v.clone()
    r, t = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.5])
    for backend in SHAPES:
        _require(backend)
        vv = v.clone().requires_grad_()
        loss, _ = dg.nft_loss(vv, v.clone(), target, r, t, eps=1e-5, backend=backend)
        (g,) = torch.autograd.grad(loss, vv)
        assert float(loss.detach()) == 0.0 and torch.isfinite(g).all() and float(g.abs().max()) == 0.0


# ---- raw ops ------------------------------------------------------------------------------------

def _op_args(bwd, adaptive, dtypes=(BF16, F32)):
    v, v_old, target, r, t = _inputs((3, 4, 5), dtypes[0], dtypes[1])
    if not bwd:
        return (v.requires_grad_(), v_old, target, r, t, 0.3, 1e-5, adaptive)
    _, parts = R.nft_loss_ref(v, v_old, target, r, t, beta=0.3, weighting="adaptive" if adaptive else "none")
    return (torch.randn(3), v, v_old, target, r, t, parts.float(), 0.3, adaptive)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("bwd", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_opcheck(backend, bwd, adaptive, seed):
    _require(backend)
    impl = get_backend(backend)
    impl.not_supported_reasons("nft_loss", ())
    ops = getattr(torch.ops, impl.namespace)
    op = (ops.nft_loss_bwd if bwd else ops.nft_loss_fwd).default
    result = torch.library.opcheck(op, _op_args(bwd, adaptive))
    assert set(result.values()) == {"SUCCESS"}, result


def test_native_op_checks_its_arguments():
    _require("native")
    v, v_old, target, r, t = _inputs((3, 10))
    ops = torch.ops.dancegrpo
    with pytest.raises(ValueError, match="beta must be finite and > 0"):
        ops.nft_loss_fwd(v, v_old, target, r, t, 0.0, 1e-5, True)
    with pytest.raises(ValueError, match="v_old has shape"):
        ops.nft_loss_fwd(v, v_old[:, :5], target, r, t, 1.0, 1e-5, True)
    with pytest.raises(ValueError, match="r must have shape"):
        ops.nft_loss_fwd(v, v_old, target, r[:2], t, 1.0, 1e-5, True)
    with pytest.raises(ValueError, match=r"parts must have shape \(3, 5\)"):
        ops.nft_loss_bwd(torch.randn(3), v, v_old, target, r, t, torch.ones(3, 4), 1.0, True)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, seed):
    """nft_loss and its backward trace into one graph (aot_eager: the fake kernels and registered
    autograd, as inductor sees them) and give the eager values exactly."""
    _require(backend)
    v, v_old, target, r, t = _inputs((3, 4, 6), BF16, F32)

    def step(v, v_old, target, r, t):
        loss, stats = dg.nft_loss(v, v_old, target, r, t, beta=0.5, backend=backend)
        return loss, stats["positive_loss"], stats["old_deviation"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    vc = v.clone().requires_grad_()
    outs = compiled(vc, v_old, target, r, t)
    (gc,) = torch.autograd.grad(outs[0], vc)
    ve = v.clone().requires_grad_()
    eager = step(ve, v_old, target, r, t)
    (ge,) = torch.autograd.grad(eager[0], ve)
    for c, e in zip(outs, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    assert torch.equal(gc, ge)


# ---- argument checks of the public function -----------------------------------------------------

def test_public_checks_name_the_argument():
    v, v_old, target, r, t = _inputs((3, 10))
    with pytest.raises(ValueError, match="nft_loss: beta must be > 0"):
        dg.nft_loss(v, v_old, target, r, t, beta=0.0)
    with pytest.raises(ValueError, match="nft_loss: weighting must be one of"):
        dg.nft_loss(v, v_old, target, r, t, weighting="x0")
    with pytest.raises(ValueError, match="nft_loss: target has shape"):
        dg.nft_loss(v, v_old, target[:, :3], r, t)
    with pytest.raises(ValueError, match=r"nft_loss: optimality must have shape \(3,\)"):
        dg.nft_loss(v, v_old, target, r[:2], t)
    with pytest.raises(ValueError, match=r"nft_loss: optimality must lie in \[0, 1\]"):
        dg.nft_loss(v, v_old, target, r + 1.5, t)
    with pytest.raises(TypeError, match="nft_loss: old_model_output must be a torch.Tensor"):
        dg.nft_loss(v, None, target, r, t)
