"""VideoAlign / VideoReward (``videoalign``) on a tiny random-init Qwen2-VL, laid out as the original.

The fixture writes a tiny ``Qwen2VLForConditionalGeneration`` base folder (weights, tokenizer
with Qwen2-VL's vision tokens and chat template, preprocessor_config.json) and a VideoReward
folder: ``model_config.json`` and ``checkpoint-<step>/`` holding the state dict of the
original's model class (Qwen2-VL + ``rm_head``) wrapped by peft's LoRA, with its keys in the
layout of the transformers the original was trained with (``visual.*``, ``model.layers.*``).
The expected scores come from that peft model's own forward (LoRA unmerged) read at the three
reward tokens; the reward merges LoRA into the weights instead.
"""

import json
import math

import pytest
import torch
from diffusers_fixtures import qwen_tokenizer
from torch import nn

from dancegrpo.errors import ConfigError, MissingFileError
from dancegrpo.registry import build_reward

PROMPTS = ["a red circle", "a blue square"]
NORM = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811, "TA_mean": 2.8105,
        "TA_std": 2.5121}
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-Instruct's chat template (its chat_template.json)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def tokenizer():
    from dancegrpo.rewards.videoalign import DETAILED_SPECIAL

    tok = qwen_tokenizer(words=[line for line in DETAILED_SPECIAL.splitlines() if line])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION]})
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(tok):
    from transformers import Qwen2VLConfig

    ids = tok.convert_tokens_to_ids(VISION)
    return Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        vision_start_token_id=ids[0], vision_end_token_id=ids[1], image_token_id=ids[2], video_token_id=ids[3])


def original_model(base, tok, seed=0):
    """The original's reward model: Qwen2-VL + rm_head, special tokens added, peft LoRA on the
    language model's linear layers (lm_head, rm_head, embed_tokens, visual excluded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    model.rm_head = nn.Linear(model.config.text_config.hidden_size, 1, bias=False)  # the original's head
    tok = tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]})
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        model.rm_head.weight.normal_(0, 1)
        model.get_input_embeddings().weight[-3:].normal_(0, 1)  # trained special-token rows
    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
               and not any(x in n for x in ("lm_head", "rm_head", "embed_tokens", "visual"))]
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return peft_model.eval(), tok


def old_layout(key):
    """transformers >= 4.52 key -> the layout the original checkpoint was saved in."""
    return key.replace("base_model.model.model.visual.", "base_model.model.visual.").replace(
        "base_model.model.model.language_model.", "base_model.model.model.")


def model_config(**data):
    return {"data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 200704, "eval_dim": ["VQ", "MQ", "TA"],
                            "prompt_template_type": "detailed_special", "sample_type": "uniform", **data},
            "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1,
                             "use_special_tokens": True, "reward_token": "special"},
            "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
            "inference_config": NORM}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("videoalign")
    base, reward = root / "Qwen2-VL-2B-Instruct", root / "VideoReward"
    tok = tokenizer()
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(tiny_config(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "min_pixels": 3136, "max_pixels": 12845056, "image_mean": MEAN, "image_std": STD, "resample": 3}))
    peft_model, full_tok = original_model(base, tok)
    state = {old_layout(k): v.clone() for k, v in peft_model.state_dict().items()}
    (reward / "checkpoint-5").mkdir(parents=True)
    (reward / "checkpoint-12").mkdir()
    torch.save(state, reward / "checkpoint-12" / "model.pth")
    torch.save({}, reward / "checkpoint-5" / "model.pth")  # an older step, not the newest
    (reward / "model_config.json").write_text(json.dumps(model_config()))
    return base, reward, peft_model, full_tok, state


def videos(b=2, t=9, h=48, w=64, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed))


def expected(reward, peft_model, video, prompts):
    """The peft model's forward on the reward's inputs, read at the special tokens, normalised."""
    pix, grids, texts = [], [], []
    for v, p in zip(video, prompts, strict=True):
        x, g = reward.video_pixels(v)
        pix.append(x)
        grids.append(g)
        texts.append(reward.text(p, x.shape[0] // 4))
    tok = reward.tokenizer(texts, padding=True, return_tensors="pt")
    inner = peft_model.base_model.model
    with torch.no_grad():
        hidden = inner.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                             pixel_values_videos=torch.cat(pix), video_grid_thw=torch.tensor(grids),
                             **reward.token_types(tok["input_ids"])).last_hidden_state
        logits = inner.rm_head(hidden)[..., 0]
    ids = reward.tokenizer.convert_tokens_to_ids(["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"])
    raw = torch.stack([logits[tok["input_ids"] == i] for i in ids], 1)  # (B, 3) in VQ, MQ, TA order
    norm = torch.stack([(raw[:, j] - NORM[f"{k}_mean"]) / NORM[f"{k}_std"] for j, k in enumerate(("VQ", "MQ", "TA"))], 1)
    return raw, norm


def test_scores_equal_the_original_model_forward(dirs):
    base, reward_dir, peft_model, _, _ = dirs
    reward = build_reward("videoalign", path=str(reward_dir), base_path=str(base), video_fps=8, device="cpu",
                          dimension="VQ")
    assert reward.lora_pairs == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    video = videos()
    raw, norm = expected(reward, peft_model, video, PROMPTS)
    assert raw.std() > 0.05
    torch.testing.assert_close(reward.raw_scores(video, PROMPTS), raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reward(video, PROMPTS), norm[:, 0], atol=1e-4, rtol=1e-4)
    for j, dim in enumerate(("MQ", "TA")):
        reward.dimension = dim
        torch.testing.assert_close(reward(video, PROMPTS), norm[:, j + 1], atol=1e-4, rtol=1e-4)
    reward.dimension = "Overall"
    torch.testing.assert_close(reward(video, PROMPTS), norm.sum(1), atol=1e-4, rtol=1e-4)
    # A prompt changes TA through the text: the same video with another prompt scores differently.
    assert not torch.allclose(reward.raw_scores(video[:1], ["a green star"]), raw[:1])


def test_adapter_layout_and_use_norm(tmp_path, dirs):
    """checkpoint-<step>/adapter_model.safetensors (LoRA, no adapter name) + non_lora_state_dict.pth
    (the trained non-LoRA weights) on the base folder's weights give the same scores."""
    from safetensors.torch import save_file

    base, reward_dir, peft_model, _, state = dirs
    ckpt = tmp_path / "VideoReward" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    lora = {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}
    rest = {k: v for k, v in state.items() if k.endswith(("rm_head.weight", "embed_tokens.weight"))}
    save_file(lora, str(ckpt / "adapter_model.safetensors"))
    torch.save(rest, ckpt / "non_lora_state_dict.pth")
    (tmp_path / "VideoReward" / "model_config.json").write_text(json.dumps(model_config()))
    reward = build_reward("videoalign", path=str(tmp_path / "VideoReward"), base_path=str(base), video_fps=8,
                          device="cpu", use_norm=False)
    video = videos(seed=1)
    raw, _ = expected(reward, peft_model, video, PROMPTS)
    torch.testing.assert_close(reward(video, PROMPTS), raw.sum(1), atol=1e-4, rtol=1e-4)


def test_frame_sampling_and_resizing_follow_qwen_vl_utils():
    from dancegrpo.rewards.videoalign import frame_indices, sample_count, smart_resize

    # fps mode: T / video_fps * fps, clamped to [4, T rounded down to even], rounded to even
    assert sample_count(81, fps=2.0, video_fps=16, num_frames=None) == 10  # 10.125 -> 10
    assert sample_count(33, fps=2.0, video_fps=16, num_frames=None) == 4  # 4.125 -> 4
    assert sample_count(9, fps=2.0, video_fps=8, num_frames=None) == 4  # 2.25 -> at least 4
    assert sample_count(3, fps=2.0, video_fps=8, num_frames=None) == 2  # at most T, even
    assert sample_count(200, fps=2.0, video_fps=4, num_frames=None) == 100
    assert sample_count(81, fps=None, video_fps=None, num_frames=7) == 8  # nframes rounded to even
    with pytest.raises(ValueError, match="at least 2"):
        sample_count(1, fps=2.0, video_fps=8, num_frames=None)
    assert frame_indices(9, 4).tolist() == [0, 3, 5, 8]
    # the transformers Qwen2-VL size rule agrees with ours on the same bounds
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    for h, w in [(48, 64), (480, 832), (720, 1280), (1000, 300), (28, 28)]:
        assert smart_resize(h, w, 28, 128 * 28 * 28, 200704) == hf_smart_resize(h, w, 28, 128 * 28 * 28, 200704)
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)


def test_pixels_match_the_qwen2_vl_processor():
    """Normalise + patchify against transformers' Qwen2-VL image processor: a 2-frame video of one
    frame is what the processor makes of an image (it repeats the frame over the temporal patch);
    pixels on uint8 levels at a size the size rule keeps, so no resampling is involved."""
    import transformers

    from dancegrpo.rewards.videoalign import patchify

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    proc = cls(image_mean=MEAN, image_std=STD, min_pixels=3136, max_pixels=12845056)
    frame = (torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(0)) * 255).round()
    want = proc([frame.permute(1, 2, 0).numpy().astype("uint8")], return_tensors="pt")
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    got, grid = patchify((frame[None].expand(2, -1, -1, -1) / 255 - m) / s, 14, 2, 2)
    assert list(grid) == want["image_grid_thw"][0].tolist() == [1, 4, 6]
    torch.testing.assert_close(got, want["pixel_values"].float(), atol=1e-5, rtol=1e-5)
    # and a real 4-frame video: group t holds frames 2t, 2t+1 in its temporal slots
    video = torch.rand(4, 3, 28, 56, generator=torch.Generator().manual_seed(1))
    patches, (gt, gh, gw) = patchify(video, 14, 2, 2)
    assert (gt, gh, gw) == (2, 2, 4) and patches.shape == (16, 3 * 2 * 14 * 14)
    first = patches[8].view(3, 2, 14, 14)  # group 1, first patch: frames 2 and 3, rows 0-13, cols 0-13
    torch.testing.assert_close(first[:, 0], video[2, :, :14, :14])
    torch.testing.assert_close(first[:, 1], video[3, :, :14, :14])
    third = patches[2].view(3, 2, 14, 14)  # merge order: (0,0), (0,1), (1,0), (1,1) within a 2x2 block
    torch.testing.assert_close(third[:, 0], video[0, :, 14:28, :14])


def test_checkpoint_choice_images_and_user_mistakes_are_one_line_errors(tmp_path, dirs):
    base, reward_dir, *_ = dirs
    kw = dict(base_path=str(base), device="cpu", video_fps=8)
    errors = []
    with pytest.raises(MissingFileError, match=r"nowhere/model_config.json not found") as e:
        build_reward("videoalign", path=str(tmp_path / "nowhere"), **kw)
    errors.append(e)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_config.json").write_text(json.dumps(model_config()))
    with pytest.raises(MissingFileError, match=r"no .*empty/checkpoint-<step> folder") as e:
        build_reward("videoalign", path=str(tmp_path / "empty"), **kw)
    errors.append(e)
    (tmp_path / "empty" / "checkpoint-7").mkdir()
    with pytest.raises(MissingFileError, match=r"checkpoint-7/adapter_model.safetensors not found") as e:
        build_reward("videoalign", path=str(tmp_path / "empty"), **kw)
    errors.append(e)
    with pytest.raises(MissingFileError, match=r"checkpoint-99 not found; have steps \[5, 12\]") as e:
        build_reward("videoalign", path=str(reward_dir), checkpoint_step=99, **kw)
    errors.append(e)
    with pytest.raises(ConfigError, match=r"has no rm_head.weight") as e:  # checkpoint-5 is an empty state dict
        build_reward("videoalign", path=str(reward_dir), checkpoint_step=5, **kw)
    errors.append(e)
    with pytest.raises(ConfigError, match=r"kwargs.video_fps .* is needed") as e:
        build_reward("videoalign", path=str(reward_dir), base_path=str(base), device="cpu")
    errors.append(e)
    with pytest.raises(ConfigError, match=r"dimension must be one of VQ, MQ, TA, Overall") as e:
        build_reward("videoalign", path=str(reward_dir), dimension="motion", **kw)
    errors.append(e)
    with pytest.raises(MissingFileError, match=r"nobase/config.json not found") as e:
        build_reward("videoalign", path=str(reward_dir), base_path=str(tmp_path / "nobase"), device="cpu", video_fps=8)
    errors.append(e)
    assert all("\n" not in str(err.value) for err in errors)
    reward = build_reward("videoalign", path=str(reward_dir), num_frames=4, **kw)
    with pytest.raises(ValueError, match=r"VideoReward does not score images"):
        reward(torch.rand(2, 3, 48, 64), PROMPTS)
    out = reward(videos(t=5), PROMPTS)
    assert out.shape == (2,) and torch.isfinite(out).all() and not math.isnan(out.sum().item())
