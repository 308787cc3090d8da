"""Tiny random-init diffusers pipelines of the real classes (FLUX, SD3, SD 1.x), built offline.

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


BUILDERS = {"flux": build_flux, "sd3": build_sd3, "sd": build_sd,
            "sd_v": lambda p: build_sd(p, prediction_type="v_prediction")}


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

# Adapter kwargs per tiny family (16x16 pixels; guidance > 1 so SD / SD3 run real CFG).
MODEL = {
    "flux": ("flux", dict(height=16, width=16, max_sequence_length=16, guidance_scale=3.5)),
    "sd3": ("sd3", dict(height=16, width=16, max_sequence_length=16, guidance_scale=4.5)),
    "sd": ("sd", dict(height=16, width=16, guidance_scale=5.0)),
    "sd_v": ("sd", dict(height=16, width=16, guidance_scale=5.0)),
}


def load_pipeline(family: str, folder):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}.get(family, StableDiffusionPipeline)
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
    if family == "sd3":
        return pipe(latents=x0, max_sequence_length=kw["max_sequence_length"],
                    negative_prompt=kw.get("negative_prompt"), **call).images
    negative = kw.get("negative_prompt")  # SD's pipeline wants one per prompt with a list of prompts
    return pipe(latents=x0, eta=0.0, negative_prompt=None if negative is None else [negative] * len(prompts),
                **call).images


# The papers' samplers: DanceGRPO on FLUX, Flow-GRPO on SD3.5, DDIM with noise on SD.
SAMPLER = {"flux": {"eta": 0.3, "variant": "dance"}, "sd3": {"eta": 0.7, "variant": "flow_grpo"},
           "sd": {"eta": 1.0}}


def train_config(family: str, folder, out, prompts_path, **top) -> dict:
    """A small GRPO config for a tiny family (family scheduler, 4 steps, 2 prompts x 3 samples)."""
    name, kwargs = MODEL[family]
    cfg = {
        "seed": 0, "max_steps": 1, "output_dir": str(out), "checkpoint_every": 0, "device": "cpu",
        "model": {"name": name, "kwargs": {"path": str(folder), **kwargs}},
        "data": {"name": "prompt_file", "kwargs": {"path": str(prompts_path)}},
        "rewards": [{"name": "jpeg_compressibility"}],
        "sampler": {"kind": "scheduler", "num_steps": 4, **SAMPLER[name]},
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
