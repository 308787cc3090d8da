"""Tiny random-init diffusers pipelines of the real classes (FLUX, SD3, SD 1.x, Qwen-Image), built
offline.

Each builder writes a complete pipeline folder with ``save_pretrained`` (tokenizers made here
from a few-letter vocabulary with the ``tokenizers`` backend; no hub access), so tests load it
through the adapters' real loading path (``model.kwargs.path``). Sizes follow diffusers' own
pipeline tests, with two blocks where the tests need selective checkpointing to differ from full.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

LETTERS = string.ascii_lowercase
PROMPTS = ["a red circle", "a blue square", "a green star", "the small yellow triangle", "a big cat",
           "an orange moon"]


def clip_tokenizer(max_length: int = 77):
    """Byte-level BPE without merges: one token per letter (ids: bos 0, eos 1, pad 2)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for suffix in ("", "</w>"):
        for c in LETTERS:
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="!")


def t5_tokenizer(max_length: int = 512):
    """Unigram over letters and word-initial letters (ids: pad 0, eos 1, unk 2)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in LETTERS] + [("\u2581" + c, -3.5) for c in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# QwenImagePipeline's prompt template (its encoder drops the first 34 tokens: the system part)
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")


def qwen_tokenizer(words=()):
    """Byte-level BPE (Qwen2's pre-tokenizer) whose merges make whole words of the Qwen-Image
    prompt template (and most words of ``PROMPTS``): the template's system part is 34 tokens, as
    with the real tokenizer, so the pipeline's fixed drop of 34 tokens keeps exactly the prompt."""
    import regex
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte.values())}
    merges = []
    lines = [*PROMPTS, *words]  # each word at a line's start (no space before it) and inside one
    text = "\n".join([QWEN_TEMPLATE.replace("<|im_start|>", "\n").replace("<|im_end|>", "\n"), *lines, " ".join(lines)])
    for piece in regex.findall(PRETOKENIZE_REGEX, text):
        chars = [byte[b] for b in piece.encode()]
        for i in range(1, len(chars)):
            left, right = "".join(chars[:i]), chars[i]
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def _clip(hidden: int, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=hidden, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                         hidden_act="gelu", projection_dim=projection or hidden, max_position_embeddings=77)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=64, d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # two levels: a vae_scale_factor of 2, so pixel and latent sizes differ as they do at full size
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2, sample_size=32, **kw)


def build_flux(path) -> Path:
    """FLUX.1-dev layout: CLIP (pooled) + T5, guidance embedding, 2 double + 2 single blocks,
    FLUX-dev's dynamic-shift scheduler. 16x16 pixels -> (2, 8, 8) latents -> 16 packed tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(2, use_quant_conv=False, use_post_quant_conv=False,
                                                      shift_factor=0.0609, scaling_factor=1.5035),
                        text_encoder=_clip(32), tokenizer=clip_tokenizer(), text_encoder_2=_t5(32),
                        tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(path)
    return Path(path)


def build_sd3(path) -> Path:
    """SD3.5 layout: CLIP-L + CLIP-G (projected, pooled 16 + 16) + T5, patch 2, shift-3 scheduler."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(16, projection=16, seed=1), tokenizer=clip_tokenizer(),
        text_encoder_2=_clip(16, projection=16, seed=2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(32, seed=3), tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(path)
    return Path(path)


def build_sd(path, prediction_type: str = "epsilon") -> Path:
    """SD 1.x layout: CLIP + UNet (cross-attention in one level) + DDIM (scaled-linear betas)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=_clip(32), tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return Path(path)


def build_qwen_image(path) -> Path:
    """Qwen-Image layout: Qwen2.5-VL text encoder (its last hidden state, template tokens
    dropped), a 3D causal VAE (scale factor 4 here) with per-channel latent statistics, 2 MM-DiT
    blocks on 2x2-packed latents, Qwen-Image's dynamic-shift scheduler with a terminal shift.
    16x16 pixels -> (4, 4, 4) latents -> 4 packed tokens."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer(["blurry"])
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                                 latents_std=[1.5, 2.0, 0.8, 1.2])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    torch.manual_seed(0)
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0, "vocab_size": len(tokenizer) + 3,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}}
    vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16, vocab_size=len(tokenizer) + 3,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), vision_start_token_id=len(tokenizer),
                              vision_end_token_id=len(tokenizer) + 1, vision_token_id=len(tokenizer) + 2)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=Qwen2_5_VLForConditionalGeneration(config),
                             tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(path)
    return Path(path)


BUILDERS = {"flux": build_flux, "sd3": build_sd3, "sd": build_sd,
            "sd_v": lambda p: build_sd(p, prediction_type="v_prediction"), "qwen_image": build_qwen_image}


def tiny_pipeline(family: str, tmp_path_factory) -> Path:
    """The folder of a tiny ``family`` pipeline, built once per test session."""
    root = tmp_path_factory.getbasetemp() / f"tiny_{family}"
    if not (root / "model_index.json").is_file():
        BUILDERS[family](root)
    return root


def prompt_file(directory, prompts=PROMPTS) -> Path:
    p = Path(directory) / "prompts.txt"
    p.write_text("\n".join(prompts) + "\n")
    return p


# --------------------------------------------------------------------------- running the real pipelines

# Adapter kwargs per tiny family (16x16 pixels; guidance > 1 so SD / SD3 / Qwen-Image run real CFG).
MODEL = {
    "flux": ("flux", dict(height=16, width=16, max_sequence_length=16, guidance_scale=3.5)),
    "sd3": ("sd3", dict(height=16, width=16, max_sequence_length=16, guidance_scale=4.5)),
    "sd": ("sd", dict(height=16, width=16, guidance_scale=5.0)),
    "sd_v": ("sd", dict(height=16, width=16, guidance_scale=5.0)),
    "qwen_image": ("qwen_image", dict(height=16, width=16, max_sequence_length=16, guidance_scale=4.0)),
}


def load_pipeline(family: str, folder):
    from diffusers import (
        FluxPipeline,
        QwenImagePipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
    )

    cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline, "qwen_image": QwenImagePipeline}.get(
        family, StableDiffusionPipeline)
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(family: str, pipe, prompts, x0: torch.Tensor, steps: int, **overrides) -> torch.Tensor:
    """The pipeline's own loop from the noise ``x0`` (adapter layout, (B, C, h, w)) to its final
    latents (``output_type="latent"``), returned in the adapter's layout."""
    kw = dict(MODEL[family][1])
    kw.update(overrides)
    call = dict(prompt=list(prompts), height=kw["height"], width=kw["width"], num_inference_steps=steps,
                guidance_scale=kw["guidance_scale"], output_type="latent")
    if family == "flux":
        from dancegrpo.models.diffusers.flux import pack, unpack

        out = pipe(latents=pack(x0), max_sequence_length=kw["max_sequence_length"], **call).images
        return unpack(out, *x0.shape[-2:])
    if family == "qwen_image":  # its CFG scale is true_cfg_scale, on only with a negative prompt
        from dancegrpo.models.diffusers.flux import pack, unpack

        call["true_cfg_scale"] = call.pop("guidance_scale")
        out = pipe(latents=pack(x0), max_sequence_length=kw["max_sequence_length"],
                   negative_prompt=kw.get("negative_prompt", " "), **call).images
        return unpack(out, *x0.shape[-2:])
    if family == "sd3":
        return pipe(latents=x0, max_sequence_length=kw["max_sequence_length"],
                    negative_prompt=kw.get("negative_prompt"), **call).images
    negative = kw.get("negative_prompt")  # SD's pipeline wants one per prompt with a list of prompts
    return pipe(latents=x0, eta=0.0, negative_prompt=None if negative is None else [negative] * len(prompts),
                **call).images


# The papers' samplers: DanceGRPO on FLUX, Flow-GRPO on SD3.5, DDIM with noise on SD.
SAMPLER = {"flux": {"eta": 0.3, "variant": "dance"}, "sd3": {"eta": 0.7, "variant": "flow_grpo"},
           "sd": {"eta": 1.0}, "qwen_image": {"eta": 0.3, "variant": "dance"}}


def train_config(family: str, folder, out, prompts_path, *, _model=None, _sampler=None, _data=None, **top) -> dict:
    """A small GRPO config for a tiny family (family scheduler, 4 steps, 2 prompts x 3 samples).
    ``_model`` / ``_sampler`` / ``_data`` replace the family's MODEL / SAMPLER entries and the
    prompt file's data kwargs (the video blocks below keep their own tables)."""
    name, kwargs = MODEL[family] if _model is None else _model
    cfg = {
        "seed": 0, "max_steps": 1, "output_dir": str(out), "checkpoint_every": 0, "device": "cpu",
        "model": {"name": name, "kwargs": {"path": str(folder), **kwargs}},
        "data": {"name": "prompt_file", "kwargs": {"path": str(prompts_path)} if _data is None else _data},
        "rewards": [{"name": "jpeg_compressibility"}],
        "sampler": {"kind": "scheduler", "num_steps": 4, **(SAMPLER[name] if _sampler is None else _sampler)},
        "rollout": {"prompts_per_step": 2, "group_size": 3},
        "timesteps": {"strategy": "dance", "fraction": 0.6},
        "optim": {"lr": 1e-3, "train_batch_size": 2, "max_grad_norm": 1.0},
        "lora": {"enabled": False, "rank": 4, "alpha": 8.0},
        "log": {"num_sample_prompts": 0, "tensorboard": False, "progress": False},
        "eval": {"num_prompts": 2, "batch_size": 2},
    }
    for key, value in top.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


# =========================================================================== Wan (wan, wan_i2v)
# Self-contained block: tiny Wan 2.1 pipelines (T2V and I2V with its CLIP image encoder), the
# adapter kwargs and a runner of the real pipelines. 32x32 pixels x 5 frames -> (16, 2, 4, 4)
# latents (the VAE's 8x spatial, 4x temporal factors) -> 8 tokens of 1x2x2 patches.

WAN_MODEL = {
    "wan": ("wan", dict(height=32, width=32, num_frames=5, max_sequence_length=16, guidance_scale=5.0)),
    # Wan 2.1 I2V's image keys and values (added_kv_proj_dim) split the image tokens off a 512-token text
    "wan_i2v": ("wan_i2v", dict(height=32, width=32, num_frames=5, max_sequence_length=512, guidance_scale=5.0)),
}
WAN_SAMPLER = {"eta": 0.3, "variant": "dance"}


def _wan_parts(in_channels: int, image_dim: int | None, added_kv_proj_dim: int | None = None):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    text = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0))
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256,
                                        ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
                                        added_kv_proj_dim=added_kv_proj_dim)
    return dict(vae=vae, text_encoder=text, tokenizer=t5_tokenizer(), transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def build_wan(path) -> Path:
    """Wan 2.1 T2V layout: UMT5 text encoder, Wan VAE, 2 Wan blocks, a shift-3 flow scheduler."""
    from diffusers import WanPipeline

    WanPipeline(**_wan_parts(16, None)).save_pretrained(path)
    return Path(path)


def build_wan_i2v(path) -> Path:
    """Wan 2.1 I2V layout: as T2V plus a CLIP vision encoder (8x8 images, 65 tokens) and a
    transformer taking 16 noise + 4 mask + 16 first-frame channels, with its own keys and values
    for the image tokens (as Wan 2.1 I2V)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    parts = _wan_parts(36, 4, added_kv_proj_dim=24)
    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=8, intermediate_size=16,
                                               patch_size=1))
    WanImageToVideoPipeline(image_encoder=encoder, image_processor=CLIPImageProcessor(crop_size=8, size=8),
                            **parts).save_pretrained(path)
    return Path(path)


BUILDERS.update({"wan": build_wan, "wan_i2v": build_wan_i2v})


def wan_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) first frames in [0, 1] on the 8-bit grid (as read from PNG files)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, size).view(1, 1, 1, size)
    return ((0.6 * base + 0.4 * ramp * torch.rand(n, 3, size, 1, generator=g)) * 255).round() / 255


def load_wan_pipeline(family: str, folder):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipe = (WanImageToVideoPipeline if family == "wan_i2v" else WanPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_wan_pipeline(family: str, pipe, prompts, x0: torch.Tensor, steps: int, image=None,
                     **overrides) -> torch.Tensor:
    """The Wan pipeline's loop from the noise ``x0`` (B, C, T, h, w) to its final latents.
    ``image``: one (3, H, W) first frame in [0, 1] for all prompts (the I2V pipeline takes one)."""
    from PIL import Image

    kw = {**WAN_MODEL[family][1], **overrides}
    call = dict(prompt=list(prompts), height=kw["height"], width=kw["width"], num_frames=kw["num_frames"],
                num_inference_steps=steps, guidance_scale=kw["guidance_scale"],
                max_sequence_length=kw["max_sequence_length"], negative_prompt=kw.get("negative_prompt"),
                latents=x0, output_type=kw.get("output_type", "latent"))
    if family == "wan_i2v":
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        call["image"] = Image.fromarray(pixels)
    return pipe(**call).frames


def wan_train_config(family: str, folder, out, prompts_path, **top) -> dict:
    """A small GRPO config for a tiny Wan family (its scheduler, 4 steps, 2 prompts x 3 samples)."""
    _, kwargs = WAN_MODEL[family]
    data = {"path": str(prompts_path)}
    if family == "wan_i2v":
        data.update(task="i2v", image_size=[kwargs["height"], kwargs["width"]])
    return train_config(family, folder, out, prompts_path, _model=WAN_MODEL[family], _sampler=WAN_SAMPLER,
                        _data=data, **top)


def wan_prompt_file(directory, family: str, prompts=PROMPTS) -> Path:
    """prompts.txt (T2V) or prompts.jsonl with one 32x32 PNG first frame a line (I2V)."""
    import json

    from PIL import Image

    directory = Path(directory)
    if family != "wan_i2v":
        return prompt_file(directory, prompts)
    (directory / "frames").mkdir(exist_ok=True)
    lines = []
    for i, (text, img) in enumerate(zip(prompts, wan_images(len(prompts)), strict=True)):
        pixels = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(directory / "frames" / f"{i}.png")
        lines.append(json.dumps({"prompt": text, "image": f"frames/{i}.png"}))
    p = directory / "prompts.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


# =========================================================================== HunyuanVideo / SkyReels (hunyuan)
# Tiny HunyuanVideo pipelines: a 3-layer Llama (its third-to-last hidden state is the text) and a
# CLIP (pooled), a 4-level causal 3D VAE (8x spatial, 4x temporal), 1 double + 1 single block.
# 9 frames of 16x16 pixels -> (4, 3, 2, 2) latents. SkyReels: the same with 2C input channels.

# Llama 3's pre-tokenizer: with whole-piece merges the template's prefix is 95 tokens, as with the
# real tokenizer, so the pipeline's fixed crop of 95 tokens keeps exactly the prompt.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llama3_tokenizer_hunyuan(words=()):
    """A byte-level BPE tokenizer with Llama 3's split and special tokens, merging each piece of
    the HunyuanVideo template, ``PROMPTS`` and ``words`` into one token (bos prepended)."""
    import regex
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte.values())}
    merges = []
    text = DEFAULT_PROMPT_TEMPLATE["template"]
    for special in LLAMA3_SPECIAL:
        text = text.replace(special, "\n")
    lines = [*PROMPTS, *words]
    for piece in regex.findall(LLAMA3_SPLIT, "\n".join([text, *lines, " ".join(lines)])):
        chars = [byte[b] for b in piece.encode()]
        for i in range(1, len(chars)):
            left, right = "".join(chars[:i]), chars[i]
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    for special in LLAMA3_SPECIAL:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in LLAMA3_SPECIAL])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", model_max_length=1024)


def _hunyuan_components(in_channels: int):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tokenizer = llama3_tokenizer_hunyuan(["blurry"])
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=32, rope_axes_dim=(2, 4, 4))
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)
    torch.manual_seed(0)
    llama = LlamaModel(LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id, hidden_size=16, intermediate_size=37,
                                   num_attention_heads=4, num_hidden_layers=3, vocab_size=len(tokenizer),
                                   hidden_act="gelu"))
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                text_encoder=llama, tokenizer=tokenizer, text_encoder_2=_clip(32, seed=1),
                tokenizer_2=clip_tokenizer())


def build_hunyuanvideo(path) -> Path:
    from diffusers import HunyuanVideoPipeline

    HunyuanVideoPipeline(**_hunyuan_components(4)).save_pretrained(path)
    return Path(path)


def build_skyreels_i2v_hunyuan(path) -> Path:
    """SkyReels-V1 layout: the HunyuanVideo transformer takes noise and the first frame's latent
    (zero-padded in time) stacked on channels."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline

    HunyuanSkyreelsImageToVideoPipeline(**_hunyuan_components(8)).save_pretrained(path)
    return Path(path)


BUILDERS.update(hunyuanvideo=build_hunyuanvideo, skyreels_i2v=build_skyreels_i2v_hunyuan)


# Adapter kwargs (9 frames of 16x16) and the papers' samplers for the HunyuanVideo families.
MODEL.update(hunyuanvideo=("hunyuanvideo", dict(height=16, width=16, num_frames=9, max_sequence_length=16,
                                                guidance_scale=6.0)),
             skyreels_i2v=("skyreels_i2v", dict(height=16, width=16, num_frames=9, max_sequence_length=16,
                                                guidance_scale=6.0, embedded_guidance_scale=1.0,
                                                negative_prompt="blurry")))
SAMPLER.update(hunyuanvideo={"eta": 0.25, "variant": "dance"}, skyreels_i2v={"eta": 0.3, "variant": "dance"})


def first_frames_hunyuan(n: int, size=(16, 16), seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) first frames in [0, 1], each a smooth colour ramp (8-bit exact)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size[1]).expand(*size)
    colours = torch.rand(n, 3, 1, 1, generator=g)
    return ((colours * ramp + (1 - colours) * ramp.T) * 255).round() / 255


def i2v_prompt_file_hunyuan(directory, prompts=PROMPTS, size=(16, 16)) -> Path:
    """prompts.jsonl with one first-frame PNG per prompt (frames/<i>.png next to it)."""
    import json

    from PIL import Image

    directory = Path(directory)
    (directory / "frames").mkdir(parents=True, exist_ok=True)
    frames = first_frames_hunyuan(len(prompts), size)
    lines = []
    for i, (prompt, frame) in enumerate(zip(prompts, frames, strict=True)):
        pixels = (frame * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(directory / "frames" / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"frames/{i}.png"}))
    path = directory / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def load_pipeline_hunyuan(family: str, folder):
    from diffusers import HunyuanSkyreelsImageToVideoPipeline, HunyuanVideoPipeline

    cls = HunyuanSkyreelsImageToVideoPipeline if family == "skyreels_i2v" else HunyuanVideoPipeline
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline_hunyuan(family: str, pipe, prompts, x0: torch.Tensor, steps: int, images=None, **overrides):
    """The pipeline's own loop from the noise ``x0`` (B, C, T, h, w) to its final latents. For
    SkyReels the first frame is encoded with the VAE posterior's mode (the adapter's choice; the
    pipeline draws a sample), patched in here so both condition on the same latent."""
    kw = dict(MODEL[family][1])
    kw.update(overrides)
    call = dict(prompt=list(prompts), height=kw["height"], width=kw["width"], num_frames=kw["num_frames"],
                num_inference_steps=steps, latents=x0, max_sequence_length=kw["max_sequence_length"],
                output_type="latent")
    if family == "hunyuanvideo":
        return pipe(guidance_scale=kw["guidance_scale"], **call).frames
    import diffusers.pipelines.hunyuan_video.pipeline_hunyuan_skyreels_image2video as module

    sample = module.retrieve_latents
    module.retrieve_latents = lambda output, generator=None, sample_mode="sample": output.latent_dist.mode()
    try:
        return pipe(image=images, negative_prompt=kw["negative_prompt"], true_cfg_scale=kw["guidance_scale"],
                    guidance_scale=kw["embedded_guidance_scale"], **call).frames
    finally:
        module.retrieve_latents = sample
