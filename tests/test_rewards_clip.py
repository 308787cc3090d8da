"""CLIP-family rewards (clip_score, pickscore, aesthetic) on tiny random-init CLIP models.

Each model is a real ``CLIPModel`` built from a tiny config, saved with ``save_pretrained``
with its tokenizer and ``CLIPImageProcessor``, and loaded through the rewards' own loading
path; scores are checked against the published formulas computed here with transformers'
processor and ``CLIPModel.forward``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers_fixtures import clip_tokenizer
from torch import nn

from dancegrpo.errors import ConfigError, MissingFileError
from dancegrpo.registry import build_reward

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"
PROMPTS = ["a red circle", "a blue square", "a green star"]
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
SIDE = 28  # the tiny vision tower's image size (4 x 4 patches of 7)


def pil_processor_class():
    """transformers' PIL image processor for CLIP (``CLIPImageProcessorPil`` in transformers 5,
    where ``CLIPImageProcessor`` is the torchvision one when torchvision is installed)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def processor(shortest_edge=32, crop=SIDE):
    return pil_processor_class()(size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop},
                              resample=3, image_mean=OPENAI_MEAN, image_std=OPENAI_STD)


def tiny_clip(path, seed=0, projection_dim=16):
    """A CLIPModel folder in the hub layout: config.json, model.safetensors, tokenizer files,
    preprocessor_config.json (resize to 32, crop 28: both steps of the transform do work)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIDE, patch_size=7),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    processor().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return path, tiny_clip(path)


def uint8_images(n, h, w, seed=0):
    """Smooth colour gradients plus noise, quantised: what the processor sees, exactly."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[None] * torch.rand(n, 3, 1, 1, generator=g)
    x = (base + 0.3 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def hand_cosine(model, images_uint8, prompts):
    """cos(img, txt) through transformers' own processor and CLIPModel.forward."""
    tok = clip_tokenizer()(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    pixels = processor()([im.permute(1, 2, 0).numpy() for im in images_uint8], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    return (out.image_embeds * out.text_embeds).sum(-1), out  # forward returns normalised embeds


# --- preprocessing ---------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(48, 64), (64, 40), (12, 20), (28, 28), (300, 233)])
@pytest.mark.parametrize("size", [(32, 28), (224, 224)])
def test_preprocess_matches_clip_image_processor(hw, size):
    """Same uint8 images through CLIPImageProcessor (PIL) and our tensor transform.

    PIL resamples uint8 in two passes and rounds after each; the tensor path keeps floats.
    In uint8 steps (x 255, undoing the normalisation): the output rounding is up to 0.5 step
    (mean 0.25) and the intermediate one up to 0.5 step times the second pass's kernel gain
    (its weights' absolute sum, up to about 1.2 for bicubic a = -0.5), so the max stays under
    1.25 steps and the mean under 0.35 (measured: max 1.1, mean 0.32 on these images). A
    wrong filter (bilinear, or bicubic without antialiasing) gives errors of several steps
    (checked below)."""
    from dancegrpo.rewards.clip import preprocess

    edge, crop = size
    images = uint8_images(3, *hw)
    proc = pil_processor_class()(size={"shortest_edge": edge}, crop_size={"height": crop, "width": crop},
                              image_mean=OPENAI_MEAN, image_std=OPENAI_STD, resample=3)
    want = proc([im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt")["pixel_values"]
    got = preprocess(images.float() / 255, shortest_edge=edge, crop=(crop, crop), mean=OPENAI_MEAN, std=OPENAI_STD)
    assert got.shape == want.shape == (3, 3, crop, crop)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    steps = ((got - want) * std * 255).abs()
    assert steps.max() <= 1.25 and steps.mean() <= 0.35, (steps.max(), steps.mean())

    # The same bound catches the mistakes it is there for.
    import torch.nn.functional as F

    h, w = hw
    if (h, w) != (crop, crop) and max(h, w) > 20:
        short, long = min(h, w), max(h, w)
        new = (edge, int(edge * long / short)) if h <= w else (int(edge * long / short), edge)
        for mode, aa in (("bilinear", True), ("bicubic", False)):
            y = F.interpolate(images.float() / 255, size=new, mode=mode, antialias=aa, align_corners=False)
            top, left = (new[0] - crop) // 2, (new[1] - crop) // 2
            wrong = (y[..., top:top + crop, left:left + crop] - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / std
            assert ((wrong - want) * std * 255).abs().max() > 1.25


def test_preprocess_stays_on_the_device_and_has_no_pil_round_trip(monkeypatch):
    import PIL.Image

    from dancegrpo.rewards.clip import preprocess

    def no_pil(*a, **k):
        raise AssertionError("PIL used")

    monkeypatch.setattr(PIL.Image, "fromarray", no_pil)
    x = torch.rand(2, 3, 40, 50, dtype=torch.float64)
    out = preprocess(x, shortest_edge=32, crop=(28, 28), mean=OPENAI_MEAN, std=OPENAI_STD)
    assert out.dtype == torch.float32 and out.device == x.device and out.shape == (2, 3, 28, 28)


# --- clip_score and pickscore ----------------------------------------------------------------

def test_clip_score_equals_the_formula(clip_dir):
    path, model = clip_dir
    reward = build_reward("clip_score", path=str(path), device="cpu")
    images = uint8_images(3, 40, 36, seed=1)
    cos, _ = hand_cosine(model, images, PROMPTS)
    want = (100 * cos).clamp(min=0)
    assert (want > 0).any() and torch.unique(want).numel() == 3  # the clamp does not hide the comparison
    got = reward(images.float() / 255, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (3,)
    # our transform vs PIL's uint8 rounding: <= 2 uint8 steps on pixels, well below 0.1 of 100 x cosine
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)
    # black images: cosines of both signs, the negative ones clamped to 0
    prompts = PROMPTS + ["the small yellow triangle", "a big cat", "an orange moon"]
    black = torch.zeros(6, 3, 40, 36, dtype=torch.uint8)
    cos_black, _ = hand_cosine(model, black, prompts)
    assert (cos_black < 0).any() and (cos_black > 0).any()
    torch.testing.assert_close(reward(black.float(), prompts), (100 * cos_black).clamp(min=0), atol=0.1, rtol=0)
    # Hessel et al.'s scale 2.5
    reward25 = build_reward("clip_score", path=str(path), device="cpu", scale=2.5)
    torch.testing.assert_close(reward25(images.float() / 255, PROMPTS), (2.5 * cos).clamp(min=0), atol=0.0025, rtol=0)


def test_clip_score_exact_without_resampling(clip_dir):
    """Images already at the resize size: no resampling, so scores agree to float precision."""
    path, model = clip_dir
    reward = build_reward("clip_score", path=str(path), device="cpu")
    images = uint8_images(3, 32, 32, seed=2)
    cos, _ = hand_cosine(model, images, PROMPTS)
    torch.testing.assert_close(reward(images.float() / 255, PROMPTS), (100 * cos).clamp(min=0), atol=1e-4, rtol=1e-5)


def test_pickscore_equals_the_model_card_formula(tmp_path, clip_dir):
    path, model = clip_dir
    # PickScore_v1's folder has no processor: it comes from the CLIP-H folder, processor_path
    proc_dir = tmp_path / "processor"
    clip_tokenizer().save_pretrained(proc_dir)
    processor().save_pretrained(proc_dir)
    model_dir = tmp_path / "pickscore"
    model.save_pretrained(model_dir)
    reward = build_reward("pickscore", path=str(model_dir), processor_path=str(proc_dir), device="cpu")
    images = uint8_images(3, 32, 32, seed=3)
    cos, out = hand_cosine(model, images, PROMPTS)
    want = model.logit_scale.exp() * cos
    torch.testing.assert_close(reward(images.float() / 255, PROMPTS), want.detach(), atol=1e-4, rtol=1e-5)
    # CLIPModel.forward's logits_per_image are exp(logit_scale) * cos too: the diagonal
    torch.testing.assert_close(reward(images.float() / 255, PROMPTS), out.logits_per_image.diagonal(), atol=1e-4,
                               rtol=1e-5)


def test_video_scores_the_mean_of_evenly_spaced_frames(clip_dir):
    path, _ = clip_dir
    reward = build_reward("clip_score", path=str(path), device="cpu", num_frames=3)
    video = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(4))
    frames = [reward(video[:, :, t], PROMPTS[:2]) for t in (0, 2, 4)]  # linspace(0, 4, 3)
    torch.testing.assert_close(reward(video, PROMPTS[:2]), torch.stack(frames).mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(frames[0], frames[1])
    every = build_reward("clip_score", path=str(path), device="cpu", num_frames=99)  # more than T: all frames
    all_frames = torch.stack([reward(video[:, :, t], PROMPTS[:2]) for t in range(5)]).mean(0)
    torch.testing.assert_close(every(video, PROMPTS[:2]), all_frames, atol=1e-5, rtol=1e-5)


def test_batching_and_bf16(clip_dir):
    path, _ = clip_dir
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompts = PROMPTS + PROMPTS[:2]
    full = build_reward("clip_score", path=str(path), device="cpu")(images, prompts)
    chunked = build_reward("clip_score", path=str(path), device="cpu", batch_size=2)(images, prompts)
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-5)
    bf16 = build_reward("clip_score", path=str(path), device="cpu", dtype="bfloat16")
    assert next(bf16.clip.model.parameters()).dtype == torch.bfloat16
    got = bf16(images, prompts)
    # bf16 keeps 8 bits of mantissa: features within ~1%, so 100 x cosine within a few units
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, full, atol=3.0, rtol=0)


def test_nonfinite_pixels_do_not_make_nan(clip_dir):
    path, _ = clip_dir
    reward = build_reward("clip_score", path=str(path), device="cpu")
    x = torch.rand(2, 3, 32, 32)
    x[0, :, :4] = float("nan")
    assert torch.isfinite(reward(x, PROMPTS[:2])).all()


# --- aesthetic -------------------------------------------------------------------------------

ORIGINAL_KEYS = ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias", "layers.4.weight",
                 "layers.4.bias", "layers.6.weight", "layers.6.bias", "layers.7.weight", "layers.7.bias"]


def original_mlp(input_size, seed=0):
    """improved-aesthetic-predictor's MLP, written out here: Linear/Dropout, no activations."""
    torch.manual_seed(seed)
    mlp = nn.Module()
    mlp.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                               nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return mlp.eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_equals_the_mlp_on_normalised_embeddings(tmp_path, clip_dir, fmt):
    path, model = clip_dir
    mlp = original_mlp(16)
    state = mlp.state_dict()
    assert list(state) == ORIGINAL_KEYS
    file = tmp_path / f"sac+logos+ava1-l14-linearMSE.{fmt}"
    if fmt == "pth":
        torch.save(state, file)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    reward = build_reward("aesthetic", path=str(file), clip_path=str(path), device="cpu")
    images = uint8_images(3, 32, 32, seed=6)
    _, out = hand_cosine(model, images, PROMPTS)
    with torch.no_grad():
        want = mlp.layers(out.image_embeds)[:, 0]  # image_embeds: the projected embedding / its norm
    got = reward(images.float() / 255, None)
    assert got.dtype == torch.float32 and torch.unique(got).numel() == 3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    video = torch.stack([images.float() / 255] * 4, dim=2)  # a still video scores as its frame
    torch.testing.assert_close(reward(video, PROMPTS), want, atol=1e-5, rtol=1e-5)


def test_aesthetic_rejects_a_state_dict_of_another_layout(tmp_path, clip_dir):
    path, _ = clip_dir
    file = tmp_path / "relu.pth"
    bad = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 1))
    torch.save({"layers." + k: v for k, v in bad.state_dict().items()}, file)
    with pytest.raises(ConfigError, match="relu.pth does not fit the aesthetic MLP") as err:
        build_reward("aesthetic", path=str(file), clip_path=str(path), device="cpu")
    assert "\n" not in str(err.value)
    wrong_dim = tmp_path / "l14.pth"
    torch.save(original_mlp(768).state_dict(), wrong_dim)  # a ViT-L/14 MLP with a 16-d tiny CLIP
    with pytest.raises(ConfigError, match="l14.pth does not fit the aesthetic MLP on 16-d"):
        build_reward("aesthetic", path=str(wrong_dim), clip_path=str(path), device="cpu")


# --- missing weights -------------------------------------------------------------------------

def test_missing_weights_name_the_file_expected(tmp_path, clip_dir, monkeypatch):
    path, model = clip_dir
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = []
    with pytest.raises(MissingFileError, match=r"kwargs.path='.*nowhere' is not a folder") as err:
        build_reward("clip_score", path=str(tmp_path / "nowhere"), device="cpu")
    cases.append(err)
    bare = tmp_path / "bare"
    model.config.save_pretrained(bare)  # config.json only
    with pytest.raises(MissingFileError, match=r"bare/model.safetensors not found") as err:
        build_reward("pickscore", path=str(bare), device="cpu")
    cases.append(err)
    no_proc = tmp_path / "no_proc"
    model.save_pretrained(no_proc)
    with pytest.raises(MissingFileError, match=r"no_proc/preprocessor_config.json not found") as err:
        build_reward("clip_score", path=str(no_proc), device="cpu")
    cases.append(err)
    with pytest.raises(MissingFileError, match=r"sac\+logos\+ava1-l14-linearMSE.pth not found") as err:
        build_reward("aesthetic", path=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip_path=str(path),
                     device="cpu")
    cases.append(err)
    with pytest.raises(ConfigError, match="kwargs.path must be a local folder"):
        build_reward("clip_score", device="cpu")
    assert all("\n" not in str(e.value) for e in cases)


# --- through the trainer ---------------------------------------------------------------------

def test_grpo_run_with_clip_rewards_from_the_config(tmp_path, clip_dir):
    from dancegrpo.trainer import Trainer, load_config

    path, _ = clip_dir
    mlp_file = tmp_path / "mlp.pth"
    torch.save(original_mlp(16).state_dict(), mlp_file)
    raw = yaml.safe_load((CONFIGS / "toy.yaml").read_text())
    raw.update(output_dir=str(tmp_path / "run"), max_steps=2, checkpoint_every=0)
    raw["log"].update(progress=False, num_sample_prompts=0, sample_every=0)
    raw["rollout"].update(prompts_per_step=2, group_size=4)
    raw["rewards"] = [{"name": "clip_score", "weight": 1.0, "kwargs": {"path": str(path), "device": "cpu"}},
                      {"name": "aesthetic", "weight": 0.5,
                       "kwargs": {"path": str(mlp_file), "clip_path": str(path), "device": "cpu"}}]
    cfg_file = tmp_path / "clip.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    history = Trainer(load_config(cfg_file)).train()
    assert len(history) == 2
    for m in history:
        for key in ("reward_clip_score_mean", "reward_aesthetic_mean", "reward_mean", "loss"):
            assert np.isfinite(m[key]), (key, m[key])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_bad_options_are_one_line_errors(clip_dir):
    from dancegrpo.errors import DeviceError

    path, _ = clip_dir
    with pytest.raises(DeviceError, match="device=cuda:1 but CUDA is not available"):
        build_reward("clip_score", path=str(path), device="cuda:1")
    with pytest.raises(ConfigError, match="clip_score: dtype must be one of"):
        build_reward("clip_score", path=str(path), device="cpu", dtype="int8")
    with pytest.raises(ConfigError, match="pickscore: num_frames must be a positive int"):
        build_reward("pickscore", path=str(path), device="cpu", num_frames=0)
