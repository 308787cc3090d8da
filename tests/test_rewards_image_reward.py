"""ImageReward (``image_reward``) on a tiny random-init checkpoint in the original's key layout.

The checkpoint is a ``torch.save``d state dict with the original module names
(``blip.visual_encoder.*`` in timm's ViT layout, ``blip.text_encoder.*`` in BLIP's med.py BERT
layout, ``mlp.layers.*``), beside a ``med_config.json``; the reward loads it through its real
path onto transformers' BLIP classes. The expected score is computed here from the raw tensors
by the original architecture's equations (timm ViT blocks, BERT with cross-attention, the MLP,
``(r - mean) / std``), so a wrong key mapping, config or mask shows.
"""

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dancegrpo.errors import ConfigError, MissingFileError
from dancegrpo.registry import build_reward

PROMPTS = ["a red circle", "a blue square on the left", "a green star"]
WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "green", "star"]
VW, VDEPTH, PATCH = 128, 2, 16  # tiny ViT at 224: 14 x 14 patches of 16, 2 heads of 64
TW, TDEPTH, THEADS, TFF = 32, 2, 4, 48
MLP_SIZES = [(TW, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]


def write_tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return len(vocab)


def original_state(vocab: int, seed=0) -> dict:
    """Random tensors under the original ImageReward names (LayerNorms random too)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    s = {}
    v = "blip.visual_encoder."
    s[v + "cls_token"] = r(1, 1, VW)
    s[v + "pos_embed"] = r(1, (224 // PATCH) ** 2 + 1, VW)
    s[v + "patch_embed.proj.weight"] = r(VW, 3, PATCH, PATCH, scale=0.05)
    s[v + "patch_embed.proj.bias"] = r(VW)
    for i in range(VDEPTH):
        b = f"{v}blocks.{i}."
        for n in ("norm1", "norm2"):
            s[b + n + ".weight"], s[b + n + ".bias"] = 1 + r(VW), r(VW)
        s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"] = r(3 * VW, VW, scale=0.1), r(3 * VW)
        s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = r(VW, VW, scale=0.1), r(VW)
        s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = r(4 * VW, VW, scale=0.1), r(4 * VW)
        s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = r(VW, 4 * VW, scale=0.05), r(VW)
    s[v + "norm.weight"], s[v + "norm.bias"] = 1 + r(VW), r(VW)
    t = "blip.text_encoder."
    s[t + "embeddings.word_embeddings.weight"] = r(vocab, TW)
    s[t + "embeddings.position_embeddings.weight"] = r(512, TW)
    s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"] = 1 + r(TW), r(TW)
    s[t + "embeddings.position_ids"] = torch.arange(512)[None]  # a buffer old checkpoints carry
    for i in range(TDEPTH):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", TW), ("crossattention", VW)):
            s[b + att + ".self.query.weight"], s[b + att + ".self.query.bias"] = r(TW, TW), r(TW)
            s[b + att + ".self.key.weight"], s[b + att + ".self.key.bias"] = r(TW, kv, scale=0.1), r(TW)
            s[b + att + ".self.value.weight"], s[b + att + ".self.value.bias"] = r(TW, kv, scale=0.1), r(TW)
            s[b + att + ".output.dense.weight"], s[b + att + ".output.dense.bias"] = r(TW, TW), r(TW)
            s[b + att + ".output.LayerNorm.weight"], s[b + att + ".output.LayerNorm.bias"] = 1 + r(TW), r(TW)
        s[b + "intermediate.dense.weight"], s[b + "intermediate.dense.bias"] = r(TFF, TW), r(TFF)
        s[b + "output.dense.weight"], s[b + "output.dense.bias"] = r(TW, TFF), r(TW)
        s[b + "output.LayerNorm.weight"], s[b + "output.LayerNorm.bias"] = 1 + r(TW), r(TW)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = r(8, VW), r(8)  # unused by the score
    s["blip.text_proj.weight"], s["blip.text_proj.bias"] = r(8, TW), r(8)
    for j, (i, o) in enumerate(MLP_SIZES):
        s[f"mlp.layers.{2 * j if j < 4 else 7}.weight"], s[f"mlp.layers.{2 * j if j < 4 else 7}.bias"] = \
            r(o, i, scale=1 / math.sqrt(i)), r(o)
    return s


def med_config(vocab):
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": TW, "initializer_range": 0.02, "intermediate_size": TFF,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
            "num_attention_heads": THEADS, "num_hidden_layers": TDEPTH, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": vocab, "encoder_width": 768, "add_cross_attention": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_reward")
    vocab = write_tokenizer(root / "bert") + 2  # + [DEC], [ENC], as the original's tokenizer
    state = original_state(vocab)
    (root / "ImageReward").mkdir()
    torch.save(state, root / "ImageReward" / "ImageReward.pt")
    (root / "ImageReward" / "med_config.json").write_text(json.dumps(med_config(vocab)))
    return root, state


# --- the original's equations, on the raw tensors ---------------------------------------------

def _attention(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = lambda x: x.view(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
    a = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        a = a + mask
    return (a.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def original_vit(s, x):
    p = "blip.visual_encoder."
    lin = lambda h, n: F.linear(h, s[p + n + ".weight"], s[p + n + ".bias"])  # noqa: E731
    ln = lambda h, n: F.layer_norm(h, (VW,), s[p + n + ".weight"], s[p + n + ".bias"], 1e-6)  # noqa: E731
    h = F.conv2d(x, s[p + "patch_embed.proj.weight"], s[p + "patch_embed.proj.bias"], stride=PATCH)
    h = torch.cat([s[p + "cls_token"].expand(len(x), -1, -1), h.flatten(2).transpose(1, 2)], 1) + s[p + "pos_embed"]
    for i in range(VDEPTH):
        q, k, v = lin(ln(h, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv").chunk(3, -1)
        h = h + lin(_attention(q, k, v, VW // 64), f"blocks.{i}.attn.proj")
        h = h + lin(F.gelu(lin(ln(h, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")
    return ln(h, "norm")


def original_score(s, ids, mask, x):
    image = original_vit(s, x)
    p = "blip.text_encoder."
    lin = lambda h, n: F.linear(h, s[p + n + ".weight"], s[p + n + ".bias"])  # noqa: E731
    ln = lambda h, n: F.layer_norm(h, (TW,), s[p + n + ".weight"], s[p + n + ".bias"], 1e-12)  # noqa: E731
    h = s[p + "embeddings.word_embeddings.weight"][ids] + s[p + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, "embeddings.LayerNorm")
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(TDEPTH):
        b = f"encoder.layer.{i}."
        for att, ctx, m in (("attention", None, additive), ("crossattention", image, None)):
            kv = h if ctx is None else ctx
            a = _attention(lin(h, b + att + ".self.query"), lin(kv, b + att + ".self.key"),
                           lin(kv, b + att + ".self.value"), THEADS, m)
            h = ln(lin(a, b + att + ".output.dense") + h, b + att + ".output.LayerNorm")
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm")
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        r = F.linear(r, s[f"mlp.layers.{j}.weight"], s[f"mlp.layers.{j}.bias"])
    return (r[:, 0] - 0.16717362830052426) / 1.0333394966054072


def original_pixels(images_uint8):
    """torchvision's Resize(224, bicubic) + CenterCrop(224) on PIL images, ToTensor, Normalize."""
    from PIL import Image

    out = []
    for im in images_uint8:
        pil = Image.fromarray(im.permute(1, 2, 0).numpy())
        w, h = pil.size
        short, long = min(w, h), max(w, h)
        new_long = int(224 * long / short)
        nw, nh = (224, new_long) if w <= h else (new_long, 224)
        pil = pil.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - 224) / 2.0)), int(round((nw - 224) / 2.0))
        pil = pil.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        out.append((x - mean) / std)
    return torch.stack(out)


def uint8_images(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[None] * torch.rand(n, 3, 1, 1, generator=g)
    return ((base + 0.3 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def tokens(root, prompts):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(root / "bert")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


# --- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(224, 224), (240, 301), (333, 250)])
def test_pixels_match_the_original_transform(hw):
    """Same bound as CLIP's processor (PIL rounds to uint8 after each pass); the crop takes
    torchvision's rounded offsets (301 -> 280 wide: left 28; 333 -> 298 high: top 37)."""
    from dancegrpo.rewards.image_reward import pixels

    images = uint8_images(2, *hw)
    want = original_pixels(images)
    got = pixels(images.float() / 255)
    assert got.shape == want.shape == (2, 3, 224, 224)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    steps = ((got - want) * std * 255).abs()
    assert steps.max() <= 1.25 and steps.mean() <= 0.35, (steps.max(), steps.mean())


def test_score_equals_the_original_equations(ckpt):
    root, state = ckpt
    reward = build_reward("image_reward", path=str(root / "ImageReward"), tokenizer_path=str(root / "bert"),
                          device="cpu", batch_size=2)
    images = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tok = tokens(root, PROMPTS)
    assert tok["input_ids"].shape == (3, 35) and tok["attention_mask"].sum(1).tolist() == [5, 8, 5]
    from dancegrpo.rewards.image_reward import pixels

    with torch.no_grad():
        want = original_score(state, tok["input_ids"], tok["attention_mask"], pixels(images))
    got = reward(images, PROMPTS)
    assert reward.model.visual_encoder.config.layer_norm_eps == 1e-6  # timm's ViT in BLIP (1e-5 moves little)
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert want.std() > 0.05  # the prompts and images make a difference
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the .pt file (not the folder) and an explicit med_config give the same model
    same = build_reward("image_reward", path=str(root / "ImageReward" / "ImageReward.pt"),
                        med_config=str(root / "ImageReward" / "med_config.json"),
                        tokenizer_path=str(root / "bert"), device="cpu")
    torch.testing.assert_close(same(images, PROMPTS), got, atol=1e-5, rtol=1e-5)


def test_video_is_the_mean_over_evenly_spaced_frames(ckpt):
    root, _ = ckpt
    reward = build_reward("image_reward", path=str(root / "ImageReward"), tokenizer_path=str(root / "bert"),
                          device="cpu", num_frames=3)
    video = torch.rand(2, 3, 5, 64, 80, generator=torch.Generator().manual_seed(2))
    frames = [reward(video[:, :, t], PROMPTS[:2]) for t in (0, 2, 4)]
    torch.testing.assert_close(reward(video, PROMPTS[:2]), torch.stack(frames).mean(0), atol=1e-5, rtol=1e-5)


def test_bf16_stays_close(ckpt):
    root, _ = ckpt
    kw = dict(path=str(root / "ImageReward"), tokenizer_path=str(root / "bert"), device="cpu")
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    full = build_reward("image_reward", **kw)(images, PROMPTS[:2])
    half = build_reward("image_reward", dtype="bf16", **kw)
    assert half.model.visual_encoder.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    got = half(images, PROMPTS[:2])
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, full, atol=0.3, rtol=0)


def test_missing_files_and_bad_checkpoints_are_one_line_errors(tmp_path, ckpt, caplog):
    root, state = ckpt
    bert = str(root / "bert")
    errors = []
    with pytest.raises(MissingFileError, match=r"nowhere not found; expected ImageReward's checkpoint") as e:
        build_reward("image_reward", path=str(tmp_path / "nowhere"), tokenizer_path=bert, device="cpu")
    errors.append(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match=r"empty/ImageReward.pt not found") as e:
        build_reward("image_reward", path=str(tmp_path / "empty"), tokenizer_path=bert, device="cpu")
    errors.append(e)
    (tmp_path / "lonely").mkdir()
    torch.save(state, tmp_path / "lonely" / "ImageReward.pt")
    with pytest.raises(MissingFileError, match=r"lonely/med_config.json not found") as e:
        build_reward("image_reward", path=str(tmp_path / "lonely"), tokenizer_path=bert, device="cpu")
    errors.append(e)
    with pytest.raises(MissingFileError, match=r"vocab.txt not found") as e:
        build_reward("image_reward", path=str(root / "ImageReward"), tokenizer_path=str(tmp_path), device="cpu")
    errors.append(e)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "med_config.json").write_text((root / "ImageReward" / "med_config.json").read_text())
    torch.save({**state, "blip.visual_encoder.extra.weight": torch.zeros(1)}, bad / "ImageReward.pt")
    with caplog.at_level(logging.WARNING, logger="dancegrpo.rewards"):  # ignored, as the original's strict=False
        build_reward("image_reward", path=str(bad), tokenizer_path=bert, device="cpu")
    assert "1 keys the score does not use (ignored): blip.visual_encoder.extra.weight" in caplog.text
    torch.save({k: v for k, v in state.items() if k != "mlp.layers.7.bias"}, bad / "ImageReward.pt")
    with pytest.raises(ConfigError, match=r"does not fit ImageReward's mlp") as e:
        build_reward("image_reward", path=str(bad), tokenizer_path=bert, device="cpu")
    errors.append(e)
    with pytest.raises(ConfigError, match="kwargs.path must be ImageReward.pt"):
        build_reward("image_reward", tokenizer_path=bert, device="cpu")
    assert all("\n" not in str(err.value) for err in errors)
