"""The video DiT: shapes and dtypes (T2I, T2V, I2V, joint attention), initialisation, text
padding, activation checkpointing, save/load, 3-D RoPE and the Wan-1.3B-width preset."""

import copy
import json

import pytest
import torch

from dancegrpo.models import DiTConfig, VideoDiT
from dancegrpo.models import dit as dit_mod
from dancegrpo.models.rope import apply_rope, rope_angles, rope_freqs, rope_sections

TEXT_DIM = 64

# name -> (config overrides, video?) covering text-to-image, text-to-video, image-to-video,
# MM-DiT joint attention and the shared (adaLN-single) modulation.
MODES = {
    "t2i": (dict(), False),
    "t2v": (dict(), True),
    "i2v": (dict(image_condition=True), True),
    "joint_t2i": (dict(joint_attention=True), False),
    "joint_i2v_shared": (dict(joint_attention=True, image_condition=True, modulation="shared"), True),
    "t2v_shared_patch2": (dict(modulation="shared", patch_size=(2, 4, 4)), True),
}


def randomize(model, generator=None):
    """Replace the DiT's zero/xavier init by random weights so every path is live (a zero-init
    model predicts 0 whatever its inputs, which would make the tests below vacuous)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=generator).to(p.dtype)
            if p.dim() == 2 and "table" not in name:
                p.copy_(r / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model


def make_inputs(cfg, batch=3, frames=3, size=12, text_len=7, video=True):
    c = cfg.in_channels
    x = torch.randn(batch, c, frames, size, size) if video else torch.randn(batch, c, size, size)
    t = torch.rand(batch) * 1000
    text = torch.randn(batch, text_len, cfg.text_dim)
    mask = torch.rand(batch, text_len) > 0.4
    mask[:, 0] = True
    mask[0] = True  # one sample without padding
    kw = dict(text_mask=mask)
    if cfg.image_condition:
        kw["first_frame"] = torch.randn(batch, c, size, size)
    return x, t, text, kw


def tiny(**overrides):
    return DiTConfig.preset("tiny", text_dim=TEXT_DIM, **overrides)


# ----------------------------------------------------------------------------- shapes, dtypes
# bf16/fp16 model vs the same weights in fp32, relative to the output's max: ~20 roundings to
# the dtype's precision through two blocks; measured 2-3 ulps (bf16) and ~1 ulp (fp16), so 10.
LOW_PRECISION_ULPS = 10


@pytest.mark.parametrize("mode", list(MODES))
def test_output_shape_and_dtype_fp32(seed, mode):
    overrides, video = MODES[mode]
    cfg = tiny(**overrides)
    model = randomize(VideoDiT(cfg))
    frames = 4 if cfg.patch_size[0] == 2 else 3
    x, t, text, kw = make_inputs(cfg, frames=frames, video=video)
    out = model(x, t, text, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("mode", ["t2i", "t2v", "i2v", "joint_i2v_shared"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_tracks_fp32(seed, mode, dtype):
    overrides, video = MODES[mode]
    cfg = tiny(**overrides)
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg, video=video)
    ref = model(x, t, text, **kw)
    low = copy.deepcopy(model).to(dtype)
    kw_low = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
    out = low(x.to(dtype), t, text.to(dtype), **kw_low)
    assert out.shape == x.shape and out.dtype == dtype
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < LOW_PRECISION_ULPS * torch.finfo(dtype).eps, err


def test_autocast_bf16_returns_input_dtype(seed):
    cfg = tiny(joint_attention=True)
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg)
    ref = model(x, t, text, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, **kw)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < LOW_PRECISION_ULPS * torch.finfo(torch.bfloat16).eps, err


def test_out_channels_and_image_input(seed):
    cfg = tiny(out_channels=5)
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg, video=False)
    assert model(x, t, text, **kw).shape == (3, 5, 12, 12)
    # an image is exactly a one-frame video
    img = model(x, t, text, **kw)
    vid = model(x[:, :, None], t, text, **kw)
    torch.testing.assert_close(vid[:, :, 0], img, atol=0, rtol=0)


def test_scalar_timestep_and_pooled(seed):
    cfg = tiny()
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg)
    t0 = torch.tensor(500.0)
    torch.testing.assert_close(model(x, t0, text, **kw), model(x, t0.expand(3), text, **kw), atol=0, rtol=0)
    # pooled=None means the masked mean of the text tokens
    keep = kw["text_mask"][..., None].float()
    pooled = (text * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(model(x, t, text, pooled=pooled, **kw), model(x, t, text, **kw), atol=1e-6, rtol=0)
    assert (model(x, t, text, pooled=torch.randn_like(pooled), **kw) - model(x, t, text, **kw)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize("mode", list(MODES))
def test_untrained_model_predicts_zero(seed, mode):
    overrides, video = MODES[mode]
    cfg = tiny(**overrides)
    model = VideoDiT(cfg)
    x, t, text, kw = make_inputs(cfg, frames=4, video=video)
    out = model(x, t, text, **kw)
    assert (out == 0).all()
    out.mul(torch.randn_like(out)).sum().backward()  # the output layer still learns
    assert model.final.linear.weight.grad.abs().max() > 0


@pytest.mark.parametrize("mode", ["t2v", "joint_i2v_shared"])
def test_blocks_are_identity_at_init(seed, mode):
    """adaLN-Zero: gates (and the ungated cross-attention projection) start at zero, so the
    tokens reaching the final layer are the patch embeddings unchanged."""
    overrides, video = MODES[mode]
    cfg = tiny(**overrides)
    model = VideoDiT(cfg)
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", o))
    model.final.register_forward_hook(lambda m, i, o: seen.__setitem__("final_in", i[0]))
    x, t, text, kw = make_inputs(cfg, video=video)
    model(x, t, text, **kw)
    torch.testing.assert_close(seen["final_in"], seen["embed"], atol=0, rtol=0)


# ----------------------------------------------------------------------------- text padding
@pytest.mark.parametrize("mode", ["t2v", "i2v", "joint_t2i", "joint_i2v_shared"])
def test_padding_tokens_have_no_effect(seed, mode):
    overrides, video = MODES[mode]
    cfg = tiny(**overrides)
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg, video=video)
    mask = kw["text_mask"]
    out = model(x, t, text, **kw)
    scale = out.abs().max()
    # 1) other values in the padded slots
    text2 = text.clone()
    text2[~mask] = 10 * torch.randn_like(text2[~mask])
    torch.testing.assert_close(model(x, t, text2, **kw), out, atol=1e-6 * scale.item(), rtol=0)
    # 2) more padding appended
    text3 = torch.cat([text, torch.randn(3, 4, cfg.text_dim)], dim=1)
    kw3 = {**kw, "text_mask": torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)}
    torch.testing.assert_close(model(x, t, text3, **kw3), out, atol=1e-6 * scale.item(), rtol=0)
    # control: without the mask the padded values do change the output
    no_mask = {k: v for k, v in kw.items() if k != "text_mask"}
    assert (model(x, t, text2, **no_mask) - model(x, t, text, **no_mask)).abs().max() > 1e-2 * scale


def test_first_frame_conditions_the_video(seed):
    cfg = tiny(image_condition=True)
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg)
    out = model(x, t, text, **kw)
    other = model(x, t, text, **{**kw, "first_frame": torch.randn_like(kw["first_frame"])})
    assert (out - other).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3  # every frame sees it
    with pytest.raises(ValueError, match="first_frame"):
        model(x, t, text, text_mask=kw["text_mask"])
    with pytest.raises(ValueError, match="image_condition is False"):
        randomize(VideoDiT(tiny()))(x, t, text, **kw)


def test_first_frame_input_layout(seed):
    """I2V input = [latent, first frame broadcast over time, flag = 1 on frame 0 only]."""
    cfg = tiny(image_condition=True, patch_size=(2, 4, 4))
    model = VideoDiT(cfg)
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", i[0]))
    x, t, text, kw = make_inputs(cfg, frames=4)
    model(x, t, text, **kw)
    ff = kw["first_frame"][:, :, None].expand_as(x)
    flag = torch.zeros_like(x[:, :1])
    flag[:, :, 0] = 1
    want, _ = model._patchify(torch.cat([x, ff, flag], dim=1))
    torch.testing.assert_close(seen["tokens"], want, atol=0, rtol=0)


# ----------------------------------------------------------------------------- checkpointing
def _loss_and_grads(model, inputs, weights):
    x, t, text, kw = inputs
    model.zero_grad(set_to_none=True)
    out = model(x, t, text, **kw)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["t2v", "joint_i2v_shared"])
def test_checkpointing_gives_identical_gradients(seed, mode):
    overrides, video = MODES[mode]
    cfg = tiny(depth=4, **overrides)
    model = randomize(VideoDiT(cfg)).train()
    inputs = make_inputs(cfg, video=video)
    weights = torch.randn_like(inputs[0])
    ref_out, ref = _loss_and_grads(model, inputs, weights)
    assert len(ref) == len(list(model.parameters()))  # every parameter gets a gradient
    for ckpt, every in (("full", 2), ("selective", 2), ("selective", 3)):
        model.set_checkpointing(ckpt, every)
        out, grads = _loss_and_grads(model, inputs, weights)
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
        assert grads.keys() == ref.keys()
        for n in ref:  # recomputation runs the same kernels on the same inputs: bitwise equal
            torch.testing.assert_close(grads[n], ref[n], atol=0, rtol=0, msg=f"{ckpt}/{every}: {n}")


def saved_activation_bytes(model, inputs):
    """Bytes autograd keeps for backward after one forward: the distinct storages packed by
    ``saved_tensors_hooks``, parameters excluded. This is the activation memory checkpointing
    exists to cut, measured exactly and deterministically on CPU (RSS would mostly measure the
    allocator). Non-reentrant checkpointing packs its regions with its own inner hooks, so
    what reaches ours is only what stays alive: un-checkpointed activations and block inputs.
    The recomputation adds one block's activations back, transiently, in backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    x, t, text, kw = inputs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, t, text, **kw)
    return sum(storages.values())


def test_checkpointing_lowers_activation_memory(seed):
    cfg = tiny(depth=4)
    model = randomize(VideoDiT(cfg)).train()
    inputs = make_inputs(cfg, frames=4, size=16)
    mem = {}
    for mode in ("none", "selective", "full"):
        model.set_checkpointing(mode, 2)
        mem[mode] = saved_activation_bytes(model, inputs)
    assert mem["full"] < mem["selective"] < mem["none"], mem
    # half the blocks recomputed saves about half; all of them leaves only block inputs
    assert mem["selective"] < 0.65 * mem["none"], mem
    assert mem["full"] < 0.15 * mem["none"], mem


def test_checkpointing_only_when_training_with_grad(monkeypatch):
    calls = []
    real = dit_mod.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dit_mod, "checkpoint", counting)
    cfg = tiny(depth=4, checkpointing="selective", checkpoint_every=2)
    model = VideoDiT(cfg)
    assert model.checkpointed_blocks() == [0, 2]
    randomize(model)
    x, t, text, kw = make_inputs(cfg)
    model.eval()
    out_eval = model(x, t, text, **kw)
    model.train()
    with torch.no_grad():
        out_nograd = model(x, t, text, **kw)
    assert calls == []
    out_ckpt = model(x, t, text, **kw)
    assert calls == [False, False]  # blocks 0 and 2, non-reentrant
    # rollouts (eval, no grad) and training forwards (checkpointed) must agree bitwise, or the
    # GRPO ratio is not exactly 1 on the first update
    torch.testing.assert_close(out_nograd, out_eval, atol=0, rtol=0)
    torch.testing.assert_close(out_ckpt.detach(), out_eval, atol=0, rtol=0)
    model.set_checkpointing("full")
    model(x, t, text, **kw)
    assert len(calls) == 6
    with pytest.raises(ValueError, match="mode must be one of"):
        model.set_checkpointing("some")
    with pytest.raises(ValueError, match="every must be a positive int"):
        model.set_checkpointing("selective", 0)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("mode,dtype", [("i2v", torch.float32), ("joint_i2v_shared", torch.bfloat16)])
def test_save_load_round_trip(tmp_path, seed, mode, dtype):
    overrides, video = MODES[mode]
    cfg = tiny(checkpointing="full", **overrides)
    model = randomize(VideoDiT(cfg)).to(dtype).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VideoDiT.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype and b[k].device.type == "cpu"
        assert torch.equal(a[k], b[k]), k
    x, t, text, kw = make_inputs(cfg, video=video)
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
    torch.testing.assert_close(loaded(x.to(dtype), t, text.to(dtype), **kw),
                               model(x.to(dtype), t, text.to(dtype), **kw), atol=0, rtol=0)
    # overwrite in place (atomic rename over the old files)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VideoDiT.from_pretrained(tmp_path)
    VideoDiT(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "other"}))
    with pytest.raises(ValueError, match="model_type"):
        VideoDiT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "unknown_field": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        VideoDiT.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- rope
def test_rope_scores_depend_only_on_offsets(seed):
    head_dim, grid = 24, (3, 4, 5)
    t, s = rope_sections(head_dim)[0], rope_sections(head_dim)[1]
    assert t + 2 * s == head_dim and t % 2 == 0 and s % 2 == 0
    n = grid[0] * grid[1] * grid[2]
    pos = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(n, 3)
    # one query and one key vector placed at every grid position
    q = torch.randn(1, 1, 2, head_dim, dtype=torch.float64).expand(1, n, 2, head_dim)
    k = torch.randn(1, 1, 2, head_dim, dtype=torch.float64).expand(1, n, 2, head_dim)

    def scores(offset, dtype=torch.float64):
        ang = rope_angles(grid, head_dim, offset=offset, dtype=dtype)
        freqs = torch.polar(torch.ones_like(ang), ang)
        qr, kr = apply_rope(q, freqs), apply_rope(k, freqs)
        return torch.einsum("bihd,bjhd->hij", qr.double(), kr.double())

    # The math, in float64 (no rounding to hide behind):
    base = scores((0, 0, 0))
    # (1) translating every position leaves every score unchanged
    torch.testing.assert_close(scores((5, -3, 11)), base, atol=1e-10, rtol=0)
    # (2) within one grid, pairs with the same 3-D offset have the same score...
    offsets = pos[None, :, :] - pos[:, None, :]  # (n, n, 3): j - i
    groups = {}
    for i in range(n):
        for j in range(n):
            groups.setdefault(tuple(offsets[i, j].tolist()), []).append((i, j))
    shared = [g for g in groups.values() if len(g) > 1]
    assert shared
    for g in shared:
        vals = torch.stack([base[:, i, j] for i, j in g])
        torch.testing.assert_close(vals, vals[:1].expand_as(vals), atol=1e-10, rtol=0)
    # ... and different offsets give different scores (the test can fail)
    firsts = torch.stack([base[:, g[0][0], g[0][1]] for g in groups.values()])
    assert torch.unique(firsts[:, 0].round(decimals=6)).numel() > 0.9 * len(groups)
    # The model's fp32 angles: off by the rounding of angles up to ~max position (fp32 eps
    # each), times the score's scale |q||k|.
    fp32 = scores((0, 0, 0), torch.float32)
    bound = 4 * max(grid) * torch.finfo(torch.float32).eps * (q.norm(dim=-1) * k.norm(dim=-1)).max().item()
    assert (fp32 - base).abs().max() < bound
    # rotations preserve norms
    freqs = rope_freqs(grid, head_dim)
    assert freqs.dtype == torch.complex64
    qr = apply_rope(q.float(), freqs)
    torch.testing.assert_close(qr.norm(dim=-1), q.float().norm(dim=-1), atol=1e-5, rtol=0)
    # the complex form is the pairwise rotation written out
    x = torch.randn(2, n, 3, head_dim)
    cos, sin = rope_angles(grid, head_dim).cos()[:, None], rope_angles(grid, head_dim).sin()[:, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    pairwise = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope(x, freqs), pairwise, atol=1e-6, rtol=0)
    assert apply_rope(x.bfloat16(), freqs).dtype == torch.bfloat16


def test_model_uses_positions(seed):
    """Everything but attention is per token and attention without positions is permutation
    equivariant, so only RoPE makes reversing the frames differ from reversing the output."""
    cfg = tiny()
    model = randomize(VideoDiT(cfg))
    x, t, text, kw = make_inputs(cfg, frames=4)
    out = model(x, t, text, **kw)
    rev = model(x.flip(2), t, text, **kw).flip(2)
    assert (rev - out).abs().max() > 1e-2 * out.abs().max()


def test_rope_sections_rejects_bad_head_dim():
    for bad in (4, 7, 0):
        with pytest.raises(ValueError, match="head_dim"):
            rope_sections(bad)


# ----------------------------------------------------------------------------- configs, errors
def test_wan_preset_has_about_1_3b_parameters():
    with torch.device("meta"):
        model = VideoDiT(DiTConfig.preset("wan-1.3b"))
    n = model.num_parameters
    assert 1.3e9 <= n <= 1.5e9, n  # Wan2.1-T2V-1.3B itself has ~1.42B
    cfg = model.config
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.text_dim, cfg.in_channels, cfg.patch_size) == \
        (1536, 30, 12, 4096, 16, (1, 2, 2))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_presets_and_config_validation():
    assert DiTConfig.preset("small").hidden_size == 192
    assert DiTConfig.preset("base", depth=3).depth == 3
    assert DiTConfig(patch_size=[1, 2, 2]).patch_size == (1, 2, 2)
    with pytest.raises(ValueError, match="name must be one of"):
        DiTConfig.preset("huge")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="head dim"):
        DiTConfig(hidden_size=16, num_heads=4)
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        DiTConfig(checkpointing="half")
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        DiTConfig(attention_backend="cudnn")
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(patch_size=(1, 4))
    with pytest.raises(TypeError, match="DiTConfig"):
        VideoDiT({"hidden_size": 64})


def test_bad_forward_inputs():
    cfg = tiny()
    model = VideoDiT(cfg)
    x, t, text, kw = make_inputs(cfg)
    with pytest.raises(ValueError, match="3 channels"):
        model(x[:, :2], t, text, **kw)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        model(x[..., :10], t, text, **kw)
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, t[:2], text, **kw)
    with pytest.raises(ValueError, match="text must be"):
        model(x, t, text[..., :10], **kw)
    with pytest.raises(TypeError, match="text_mask must be a bool"):
        model(x, t, text, text_mask=kw["text_mask"].float())
    with pytest.raises(ValueError, match="pooled must be"):
        model(x, t, text, pooled=torch.randn(3, 5), **kw)
    with pytest.raises(ValueError, match="patch_size\\[0\\] == 1"):
        VideoDiT(tiny(patch_size=(2, 4, 4)))(x[:, :, 0], t, text, **kw)


def test_frame_embedding(seed):
    """A learned per-latent-frame embedding: absent by default, a no-op at its zero init, live
    once trained (each frame gets its own vector), and bounded by its size."""
    assert VideoDiT(tiny()).frame_embed is None
    plain = randomize(VideoDiT(tiny()))
    framed = VideoDiT(tiny(frame_embedding=4))
    missing, unexpected = framed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["frame_embed"] and not unexpected
    assert framed.frame_embed.shape == (4, tiny().hidden_size) and not framed.frame_embed.any()
    x, t, text, kw = make_inputs(tiny(), frames=3)
    with torch.no_grad():
        torch.testing.assert_close(framed(x, t, text, **kw), plain(x, t, text, **kw))
        tokens0, grid = framed.embed(x)
        framed.frame_embed.copy_(torch.randn(4, tiny().hidden_size))
        tokens1, _ = framed.embed(x)
    diff = (tokens1 - tokens0).view(3, grid[0], grid[1] * grid[2], -1)
    for f in range(grid[0]):  # frame f's tokens all moved by frame_embed[f]
        torch.testing.assert_close(diff[:, f], framed.frame_embed[f].expand_as(diff[:, f]))
    with pytest.raises(ValueError, match="frame_embedding only embeds 4"):
        framed(torch.randn(1, 3, 5, 12, 12), torch.rand(1), torch.randn(1, 2, TEXT_DIM))
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="frame_embedding"):
            tiny(frame_embedding=bad)
