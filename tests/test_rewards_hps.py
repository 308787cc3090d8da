"""hps_v2: a tiny random open_clip-layout checkpoint loaded through the real path, scored against
HPSv2's formula computed by hand from the checkpoint's own tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dancegrpo.errors import CheckpointError, MissingFileError
from dancegrpo.registry import build_reward
from dancegrpo.rewards.hps import OPENAI_MEAN, OPENAI_STD, preprocess, transformers_to_openclip
from diffusers_fixtures import clip_tokenizer

CONTEXT = 12
PROMPTS = ["a red circle", "a blue square", "a red circle", "the small yellow triangle and more words"]


def tiny_config(vocab_size: int) -> dict:
    return {"projection_dim": 8,
            "vision": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "patch_size": 4, "image_size": 16},
            "text": {"vocab_size": vocab_size, "hidden_size": 16, "intermediate_size": 24,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": CONTEXT}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, tokenizer folder, config, open_clip-layout state dict)."""
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("hps")
    tok = clip_tokenizer(CONTEXT)
    tok.save_pretrained(root / "tokenizer")
    cfg = tiny_config(len(tok))
    torch.manual_seed(0)
    text = {"hidden_act": "gelu", "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": None, **cfg["text"]}
    vision = {"hidden_act": "gelu", **cfg["vision"]}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["projection_dim"]))
    with torch.no_grad():  # every tensor random, so a swapped or misplaced key changes the score
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = transformers_to_openclip(model.state_dict())
    torch.save({"epoch": 1, "state_dict": sd}, root / "HPS_v2.1_compressed.pt")
    return str(root / "HPS_v2.1_compressed.pt"), str(root / "tokenizer"), cfg, sd


def _block(x, sd, p, heads, mask=None):
    """One open_clip residual block with plain ops: x + attn(ln_1 x); x + mlp(ln_2 x)."""
    w = x.shape[-1]
    h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.view(*t.shape[:2], heads, w // heads).transpose(1, 2)  # noqa: E731
    att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // heads)
    if mask is not None:
        att = att + mask
    o = (att.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
    x = x + o @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
    h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]


def reference_scores(sd, cfg, tokenizer, images, prompts):
    """HPSv2: cosine of normalised image and text features, from the open_clip tensors alone."""
    vis = cfg["vision"]
    x = preprocess(images, vis["image_size"])
    x = F.conv2d(x, sd["visual.conv1.weight"], stride=vis["patch_size"]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    w = x.shape[-1]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _block(x, sd, "visual.transformer.resblocks.0.", vis["num_attention_heads"])
    img = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]

    ids = torch.zeros(len(prompts), CONTEXT, dtype=torch.long)
    eot = []
    for i, p in enumerate(prompts):
        row = tokenizer(p)["input_ids"]
        if len(row) > CONTEXT:
            row = row[:CONTEXT - 1] + [tokenizer.eos_token_id]
        ids[i, :len(row)] = torch.tensor(row)
        eot.append(len(row) - 1)
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    t = _block(t, sd, "transformer.resblocks.0.", cfg["text"]["num_attention_heads"], causal)
    wt = t.shape[-1]
    t = F.layer_norm(t, (wt,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = t[torch.arange(len(prompts)), torch.tensor(eot)] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


def test_score_equals_hand_computed_cosine(tiny):
    path, tok_dir, cfg, sd = tiny
    reward = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg)
    torch.manual_seed(1)
    images = torch.rand(len(PROMPTS), 3, 20, 28)  # non-square: resize + pad
    got = reward(images, PROMPTS)
    want = reference_scores(sd, cfg, reward.tokenizer, images, PROMPTS)
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert got.std() > 1e-3  # the scores depend on the inputs
    scaled = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg, scale=100.0)
    assert torch.allclose(scaled(images, PROMPTS), 100 * want, atol=1e-3)


def test_open_clip_tokenization(tiny):
    path, tok_dir, cfg, _ = tiny
    reward = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg)
    ids, eot = reward.tokenize(["ab", "abcdefghijklmnopq"])
    short, long = (reward.tokenizer(p)["input_ids"] for p in ("ab", "abcdefghijklmnopq"))
    assert short[0] == reward.tokenizer.bos_token_id and short[-1] == reward.tokenizer.eos_token_id
    assert ids[0].tolist() == short + [0] * (CONTEXT - len(short))  # zero-padded, as open_clip
    assert len(long) > CONTEXT and ids[1].tolist() == long[:CONTEXT - 1] + [reward.tokenizer.eos_token_id]
    assert eot.tolist() == [len(short) - 1, CONTEXT - 1]


def test_video_scores_frames_and_averages(tiny):
    path, tok_dir, cfg, _ = tiny
    reward = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg, batch_size=2)
    torch.manual_seed(2)
    video = torch.rand(2, 3, 3, 16, 16)
    prompts = PROMPTS[:2]
    per_frame = torch.stack([reward(video[:, :, i], prompts) for i in range(3)], dim=1)
    assert torch.allclose(reward(video, prompts), per_frame.mean(1), atol=1e-6)
    two = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg, frames=2)
    assert torch.allclose(two(video, prompts), per_frame[:, [0, 2]].mean(1), atol=1e-6)


def test_bfloat16_close_to_float32(tiny):
    path, tok_dir, cfg, _ = tiny
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    full = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg)(images, PROMPTS[:2])
    half = build_reward("hps_v2", path=path, tokenizer=tok_dir, config=cfg, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    assert torch.allclose(half(images, PROMPTS[:2]), full, atol=0.05)


def test_preprocess_matches_pil_reference():
    """HPSv2's transform on a PIL image: longest side to 32 (bicubic), zero-pad centred, normalise.
    PIL runs its two separable passes in uint8 (rounding, and clipping overshoot, after each), so
    the pixels stay in [48, 208), where bicubic overshoot cannot reach 0 or 255, and values agree
    to the rounding, 1/255, before normalisation (no antialiasing is off by ~57/255, bilinear ~18/255)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(48, 208, size=(48, 36, 3), dtype=np.uint8)  # H 48, W 36 -> 32 x 24, pad 4 + 4
    pil = np.asarray(Image.fromarray(pixels).resize((24, 32), Image.BICUBIC), dtype=np.float32) / 255
    want = torch.zeros(3, 32, 32)
    want[:, :, 4:28] = torch.from_numpy(pil).permute(2, 0, 1)
    got = preprocess(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, 32)[0]
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert (got * std + mean - want).abs().max() < 1 / 255 + 1e-6


def test_missing_files_name_the_file(tiny, tmp_path):
    _, tok_dir, cfg, _ = tiny
    with pytest.raises(MissingFileError, match="HPS_v2.1_compressed.pt") as err:
        build_reward("hps_v2", path=str(tmp_path / "nope.pt"), tokenizer=tok_dir, config=cfg)
    assert "\n" not in str(err.value) and "nope.pt" in str(err.value)
    with pytest.raises(MissingFileError, match="tokenizer.json"):
        build_reward("hps_v2", path=tiny[0], tokenizer=str(tmp_path), config=cfg)


def test_checkpoint_of_another_shape_is_one_line(tiny, tmp_path):
    path, tok_dir, cfg, _ = tiny
    with pytest.raises(CheckpointError, match="shape") as err:
        build_reward("hps_v2", path=path, tokenizer=tok_dir, config={**cfg, "projection_dim": 4})
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.pt"
    sd = dict(tiny[3])
    del sd["visual.ln_post.weight"]
    torch.save(sd, bad)  # also the bare state dict layout (no "state_dict" key)
    with pytest.raises(CheckpointError, match="visual_projection|post_layernorm"):
        build_reward("hps_v2", path=str(bad), tokenizer=tok_dir, config=cfg)
