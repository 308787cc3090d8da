"""Stable Diffusion 3 / 3.5 as a ``GenerativeModel``: rectified flow (MM-DiT), CLIP-L + CLIP-G
+ T5 text, real classifier-free guidance with the unconditional and conditional halves in one
forward (``guidance_scale`` > 1; ``negative_prompt``, default empty).

Latents are the VAE's ``(16, H/8, W/8)``; the transformer is fed ``1000 sigma``.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from ...trainer.config import ConfigError
from ..interface import Conditioning
from .common import (
    DiffusersAdapter,
    Frozen,
    build,
    flow_sampler_from_scheduler,
    load_component,
    positive_int,
    text_arg,
)
from .flux import ATTENTION

__all__ = ["SD3Model", "build_sd3"]


class SD3Model(DiffusersAdapter):
    prediction = "velocity"
    denoiser_name = "transformer"
    lora_target_modules = ATTENTION  # Flow-GRPO's SD3.5 targets
    pipeline_class = StableDiffusion3Pipeline

    def __init__(self, path, *, dtype="float32", height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256, guidance_scale: float = 7.0, negative_prompt: str = "", **common):
        super().__init__(path, dtype=dtype, guidance_scale=guidance_scale, **common)
        self.negative_prompt = text_arg("negative_prompt", negative_prompt)
        self.max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        if self.max_sequence_length > 512:
            raise ConfigError(f"model.kwargs.max_sequence_length must be <= 512 for SD3, got {max_sequence_length}")
        src, dt = self.source, self.weight_dtype
        self.transformer = load_component(SD3Transformer2DModel, src, "transformer", dt)
        vae = load_component(AutoencoderKL, src, "vae", dt)
        text = StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None,
            text_encoder=load_component(CLIPTextModelWithProjection, src, "text_encoder", dt),
            tokenizer=load_component(AutoTokenizer, src, "tokenizer"),
            text_encoder_2=load_component(CLIPTextModelWithProjection, src, "text_encoder_2", dt),
            tokenizer_2=load_component(AutoTokenizer, src, "tokenizer_2"),
            text_encoder_3=load_component(T5EncoderModel, src, "text_encoder_3", dt),
            tokenizer_3=load_component(AutoTokenizer, src, "tokenizer_3"))
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, src, "scheduler")
        self._freeze(vae, text.text_encoder, text.text_encoder_2, text.text_encoder_3)
        self.frozen = Frozen(vae=vae, text=text, scheduler_config=scheduler.config, negative=None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        step = self.vae_scale_factor * self.transformer.config.patch_size
        default = self.transformer.config.sample_size * self.vae_scale_factor  # 1024 px for SD3.5
        self.height = self._check_size("height", default if height is None else height, step)
        self.width = self._check_size("width", default if width is None else width, step)
        self.set_checkpointing(*self._checkpointing)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, self.height // self.vae_scale_factor,
                self.width // self.vae_scale_factor)

    def _text_encoders(self):
        t = self.frozen.text
        return [t.text_encoder, t.text_encoder_2, t.text_encoder_3]

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.frozen.text.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided velocity (B, C, h, w) at ``timesteps`` = 1000 sigma."""
        dtype = self.weight_dtype
        x, t, c = self._cfg_inputs(latents.to(dtype), timesteps.to(latents.device), cond, dtype)
        out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=c["prompt_embeds"],
                               pooled_projections=c["pooled"], return_dict=False)[0]
        return self._cfg_combine(out)

    def scheduler_sampler(self, num_steps: int, eta: float, variant: str = "dance"):
        """SD3's own schedule: the scheduler's shifted sigmas (shift 3 for SD3.5; the
        resolution-dependent mu when the scheduler uses dynamic shifting, as the pipeline does)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.frozen.scheduler_config)
        cfg, kwargs = scheduler.config, {}
        if cfg.get("use_dynamic_shifting", False):
            _, h, w = self.latent_shape()
            p = self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift((h // p) * (w // p), cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16))
        return flow_sampler_from_scheduler(scheduler, num_steps, eta, variant, num_inference_steps=num_steps, **kwargs)

    def _checkpoint_units(self):
        return list(self.transformer.transformer_blocks)


def build_sd3(path: str | None = None, **kwargs) -> SD3Model:
    """SD3 / SD3.5 from a diffusers pipeline folder (or a cached hub id): ``model.kwargs.path``."""
    return build(SD3Model, "sd3", path, kwargs)
