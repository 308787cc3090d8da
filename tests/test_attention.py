"""The attention dispatcher: every backend against a plain softmax reference, padding,
dispatch rules (declared support, reasons, explicit vs auto) and lazy optional imports."""

import importlib
import sys

import pytest
import torch

from dancegrpo.models import attention as attn_mod
from dancegrpo.models.attention import attention, available_backends, get_backend

# fp64/fp32: max abs error against the float64 reference (accumulation-order noise of O(1)
# values; the measured fp32 error is ~1e-6). bf16/fp16: flash-attention's rule instead of a fixed
# number, since inputs, probabilities and outputs are all rounded: the error must be at most 2x
# the error of PyTorch's own math run in that dtype, plus one ulp of the largest value (outputs
# and gradients are returned rounded to the dtype, which alone costs half an ulp).
TOL = {torch.float64: dict(fwd=1e-10, bwd=1e-10), torch.float32: dict(fwd=2e-5, bwd=5e-5)}


def low_precision_math(q, k, v, mask=None):
    """The same attention written with PyTorch ops in the inputs' dtype (the bar to meet)."""
    s = torch.einsum("bshd,blhd->bhsl", q, k) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhsl,blhd->bshd", s.softmax(-1), v)


def assert_close_to_ref(got, ref, low, dtype, what):
    """got vs the float64 ref: TOL for fp32/fp64, the 2x rule (low = PyTorch math in dtype)
    for bf16/fp16."""
    err = (got.double() - ref.double()).abs().max().item()
    if dtype in TOL:
        bound = TOL[dtype]["bwd" if what.startswith("grad") else "fwd"]
    else:
        low_err = (low.double() - ref.double()).abs().max().item()
        bound = 2 * low_err + torch.finfo(dtype).eps * ref.abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} ({dtype})"


def reference(q, k, v, mask=None, scale=None):
    """Plain softmax attention in float64 (the spec); all-padding samples give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bshd,blhd->bhsl", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:
        p = torch.nan_to_num(p, nan=0.0)  # a row of -inf only (no valid key) -> zeros
    return torch.einsum("bhsl,blhd->bshd", p, v)


def _inputs(b, s, lk, h, d, dtype, noncontig=False):
    if noncontig:  # a transposed view: strides not the packed (B, S, H, D) ones
        mk = lambda n: torch.randn(b, h, n, d, dtype=torch.float32).transpose(1, 2).to(dtype)
    else:
        mk = lambda n: torch.randn(b, n, h, d, dtype=torch.float32).to(dtype)
    q, k, v = mk(s), mk(lk), mk(lk)
    return [t.requires_grad_() for t in (q, k, v)]


def _random_mask(b, lk, min_valid=1):
    lens = torch.randint(min_valid, lk + 1, (b,))
    mask = torch.arange(lk)[None] < lens[:, None]
    # shuffle each row: the API takes any padding pattern, not only right padding
    perm = torch.argsort(torch.rand(b, lk), dim=1)
    return torch.gather(mask, 1, perm)


def _grads(out, go, ins):
    return torch.autograd.grad(out, ins, go)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 7, 2, 16), (3, 37, 13, 3, 24)])
def test_sdpa_matches_reference(seed, dtype, masked, shape):
    b, s, lk, h, d = shape
    q, k, v = _inputs(b, s, lk, h, d, dtype, noncontig=(s == 37))
    mask = _random_mask(b, lk) if masked else None
    out = attention(q, k, v, mask, backend="sdpa")
    assert out.shape == (b, s, h, d) and out.dtype == dtype
    ref = reference(q, k, v, mask)
    low = low_precision_math(q, k, v, mask)
    assert_close_to_ref(out, ref, low, dtype, "output")
    go = torch.randn_like(ref)
    got = _grads(out, go.to(dtype), (q, k, v))
    want = _grads(ref, go, (q, k, v))
    lows = _grads(low, go.to(dtype), (q, k, v))
    for g, w, lo, name in zip(got, want, lows, "qkv", strict=True):
        assert_close_to_ref(g, w, lo, dtype, f"grad {name}")


def test_padded_keys_are_ignored(seed):
    b, s, lk, h, d = 3, 10, 9, 2, 16
    q, k, v = _inputs(b, s, lk, h, d, torch.float32)
    mask = _random_mask(b, lk)
    out = attention(q, k, v, mask, backend="sdpa")
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~mask] = 100 * torch.randn_like(k2[~mask])
    v2[~mask] = 100 * torch.randn_like(v2[~mask])
    torch.testing.assert_close(attention(q, k2, v2, mask, backend="sdpa"), out, atol=1e-6, rtol=0)
    # control: without the mask the same change moves the output a lot
    assert (attention(q, k2, v2, None, backend="sdpa") - attention(q, k, v, None, backend="sdpa")).abs().max() > 0.1


def test_all_padding_sample_gives_zeros(seed):
    b, s, lk, h, d = 3, 5, 6, 2, 8
    q, k, v = _inputs(b, s, lk, h, d, torch.float32)
    mask = _random_mask(b, lk)
    mask[1] = False
    out = attention(q, k, v, mask, backend="sdpa")
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    assert_close_to_ref(out, reference(q, k, v, mask), None, torch.float32, "output")
    gq, gk, gv = _grads(out, torch.randn_like(out), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert (gq[1] == 0).all() and (gk[1] == 0).all()


def test_no_keys_gives_zeros():
    q = torch.randn(2, 4, 2, 8)
    k = v = torch.randn(2, 0, 2, 8)
    out = attention(q, k, v, torch.zeros(2, 0, dtype=torch.bool))
    assert out.shape == q.shape and (out == 0).all()


def test_custom_scale(seed):
    q, k, v = _inputs(2, 6, 5, 2, 8, torch.float64)
    out = attention(q, k, v, backend="sdpa", scale=0.7)
    torch.testing.assert_close(out, reference(q, k, v, scale=0.7), atol=1e-10, rtol=0)


def test_auto_picks_sdpa_on_cpu(seed):
    q, k, v = _inputs(1, 4, 4, 1, 8, torch.float32)
    assert attn_mod.select_backend(q, k, v).name == "sdpa"
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="sdpa"), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_explicit_unusable_backend_raises_with_reasons(name):
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match=rf"attention backend '{name}' cannot run.*device 'cpu'"):
        attention(q, q, q, backend=name)


def test_flash_reasons_cover_dtype_and_head_dim():
    q = torch.randn(1, 4, 1, 12, dtype=torch.float64)
    reasons = get_backend("flash").not_supported_reasons(q, q, q)
    text = "; ".join(reasons)
    assert "dtype torch.float64" in text and "not a multiple of 8" in text and "device 'cpu'" in text
    big = torch.randn(1, 1, 1, 320, dtype=torch.float16)
    assert any("head dim 320 > 256" in r for r in get_backend("flash").not_supported_reasons(big, big, big))


def test_auto_raises_listing_every_backend(monkeypatch):
    monkeypatch.setattr(attn_mod, "PRIORITY", ("flash", "xformers"))
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="no attention backend") as info:
        attention(q, q, q)
    msg = str(info.value)
    assert "flash:" in msg and "xformers:" in msg and "device 'cpu'" in msg


def test_env_override(monkeypatch):
    q = torch.randn(1, 4, 1, 8)
    monkeypatch.setenv("DANCEGRPO_ATTENTION_BACKEND", "xformers")
    with pytest.raises(RuntimeError, match="'xformers' cannot run"):
        attention(q, q, q)
    monkeypatch.setenv("DANCEGRPO_ATTENTION_BACKEND", "sdpa")
    assert attention(q, q, q).shape == q.shape


def test_bad_inputs():
    q = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match="k and v must be"):
        attention(q, q[:, :, :1], q)
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, q.double(), q.double())
    with pytest.raises(TypeError, match="floating point"):
        attention(q, q.long(), q)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool"):
        attention(q, q, q, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, L\) = \(2, 4\)"):
        attention(q, q, q, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention backend must be one of"):
        attention(q, q, q, backend="magic")
    with pytest.raises(ValueError, match="scale must be"):
        attention(q, q, q, scale=-1.0)


def test_available_backends_on_cpu():
    assert attn_mod.availability is available_backends  # the name dancegrpo.env looks for
    av = available_backends("cpu")
    assert list(av) == ["flash", "xformers", "sdpa"]
    assert av["sdpa"] == []
    assert av["flash"] and av["xformers"]  # never runnable on CPU, and they say why


def test_optional_kernels_are_not_imported_on_cpu(tmp_path, monkeypatch):
    """A flash_attn that is installed but must not be imported on a CPU run: find_spec sees
    it (the reason is the device, not 'not installed'), and importing it would raise."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('flash_attn imported on a CPU run')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setattr(attn_mod, "_BACKENDS", {})  # fresh backend objects, no cached lookups
    q = torch.randn(1, 4, 1, 8)
    out = attention(q, q, q)
    assert out.shape == q.shape
    reasons = get_backend("flash").not_supported_reasons(q, q, q)
    assert not any("not installed" in r for r in reasons), reasons
    assert "flash_attn" not in sys.modules


class FakeFlash:
    """flash-attn's calling convention (dense and variable-length) computed by the reference,
    so the packing that FlashBackend does around the kernel (valid keys gathered, int32
    cu_seqlens, max lengths) is tested on CPU. The real kernels are tested on a GPU below."""

    @staticmethod
    def flash_attn_func(q, k, v, softmax_scale=None):
        return reference(q, k, v, scale=softmax_scale).to(q.dtype)

    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):
        assert q.dim() == k.dim() == v.dim() == 3 and k.shape == v.shape
        assert cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.shape == cu_k.shape
        assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]
        outs = []
        for i in range(len(cu_q) - 1):
            qs, ks, vs = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            assert 0 < ks.shape[0] <= max_k and qs.shape[0] <= max_q
            outs.append(reference(qs[None], ks[None], vs[None], scale=softmax_scale)[0])
        return torch.cat(outs).to(q.dtype), None  # some FA3 releases also return the lse


class FakeXformers:
    """xformers' memory_efficient_attention with a BlockDiagonalMask, by the reference."""

    class BlockDiagonalMask:
        def __init__(self, q_seqlen, kv_seqlen):
            self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            assert all(isinstance(n, int) for n in (*q_seqlen, *kv_seqlen))
            return cls(q_seqlen, kv_seqlen)

    @classmethod
    def memory_efficient_attention(cls, q, k, v, attn_bias=None, scale=None):
        if attn_bias is None:
            return reference(q, k, v, scale=scale).to(q.dtype)
        assert isinstance(attn_bias, cls.BlockDiagonalMask) and q.shape[0] == k.shape[0] == 1
        qs, ks, vs = (t[0].split(n) for t, n in ((q, attn_bias.q_seqlen), (k, attn_bias.kv_seqlen),
                                                 (v, attn_bias.kv_seqlen)))
        outs = [reference(a[None], b[None], c[None], scale=scale)[0] for a, b, c in zip(qs, ks, vs, strict=True)]
        return torch.cat(outs)[None].to(q.dtype)


@pytest.mark.parametrize("name", ["flash", "xformers"])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_backends_pack_padding_correctly(seed, monkeypatch, name, masked):
    backend = attn_mod.FlashBackend() if name == "flash" else attn_mod.XformersBackend()
    if name == "flash":
        monkeypatch.setattr(backend, "_pick", lambda device: FakeFlash)
    else:
        backend.ops._module = FakeXformers
        monkeypatch.setitem(sys.modules, "xformers.ops.fmha.attn_bias", FakeXformers)
    monkeypatch.setattr(backend, "not_supported_reasons", lambda *a: [])  # run on CPU
    monkeypatch.setitem(attn_mod._BACKENDS, name, backend)
    b, s, lk, h, d = 4, 9, 11, 2, 16
    q, k, v = _inputs(b, s, lk, h, d, torch.float64, noncontig=True)
    mask = _random_mask(b, lk) if masked else None
    if masked:
        mask[2] = False  # one sample with no valid key at all
    out = attention(q, k, v, mask, backend=name, scale=0.3)
    ref = reference(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    gq, gk, gv = _grads(out, torch.ones_like(out), (q, k, v))
    wq, wk, wv = _grads(ref, torch.ones_like(ref), (q, k, v))
    for g, w in ((gq, wq), (gk, wk), (gv, wv)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


def _check_low_precision(name, dtype, masked):
    """A GPU backend in bf16/fp16 against float64, by the 2x rule of assert_close_to_ref."""
    torch.manual_seed(0)
    b, s, lk, h, d = 3, 257, 77, 4, 64
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for n in (s, lk, lk))
    mask = _random_mask(b, lk).cuda() if masked else None
    out = attention(q, k, v, mask, backend=name)
    ref, low = reference(q, k, v, mask), low_precision_math(q, k, v, mask)
    assert_close_to_ref(out, ref, low, dtype, f"{name} output")
    go = torch.randn_like(out)
    grads = zip(_grads(out, go, (q, k, v)), _grads(ref, go.double(), (q, k, v)), _grads(low, go, (q, k, v)), "qkv", strict=True)
    for g, r, lo, n in grads:
        assert_close_to_ref(g, r, lo, dtype, f"{name} grad {n}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["flash", "xformers", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_backends_agree(name, dtype, masked):
    q = torch.randn(1, 1, 1, 64, device="cuda", dtype=dtype)
    reasons = get_backend(name).not_supported_reasons(q, q, q)
    if reasons:
        pytest.skip(f"{name}: " + "; ".join(reasons))
    _check_low_precision(name, dtype, masked)


@pytest.mark.gpu
def test_gpu_all_padding_sample_gives_zeros_on_every_backend():
    q = torch.randn(2, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    mask[0] = False
    for name in ("flash", "xformers", "sdpa"):
        if get_backend(name).not_supported_reasons(q, q, q, mask):
            continue
        out = attention(q, q, q, mask, backend=name)
        assert (out[0] == 0).all() and torch.isfinite(out).all(), name
