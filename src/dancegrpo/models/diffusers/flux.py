"""FLUX.1 (dev / schnell) as a ``GenerativeModel``: rectified flow, CLIP pooled + T5 text,
2x2-packed latents and the distilled guidance embedding.

Latents are the VAE's unpacked ``(C, H/8, W/8)`` (C = 16 for FLUX.1): noise, trajectories and
log-probs live in that shape, and ``predict`` packs 2x2 patches into tokens and unpacks the
velocity (a permutation, so log-probs are the same in either form). ``guidance_scale`` is the
guidance *embedding* value (3.5 for FLUX.1-dev); FLUX.1-schnell has no embedding and ignores it.
There is no negative prompt: the guidance is distilled into the model.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from ...trainer.config import ConfigError
from ..interface import Conditioning
from .common import (
    DiffusersAdapter,
    Frozen,
    build,
    flow_sampler_from_scheduler,
    load_component,
    positive_int,
)

__all__ = ["FluxModel", "build_flux", "pack", "unpack"]

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C) tokens of 2x2 patches (FLUX's order: c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a (h, w) latent."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) token positions: (0, row, column) of each 2x2 patch."""
    rows = torch.arange(h // 2, device=device).repeat_interleave(w // 2)
    cols = torch.arange(w // 2, device=device).repeat(h // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class FluxModel(DiffusersAdapter):
    prediction = "velocity"
    denoiser_name = "transformer"
    lora_target_modules = ATTENTION
    pipeline_class = FluxPipeline

    def __init__(self, path, *, dtype="float32", height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 512, guidance_scale: float = 3.5, negative_prompt: str | None = None,
                 **common):
        super().__init__(path, dtype=dtype, guidance_scale=guidance_scale, **common)
        if negative_prompt:
            raise ConfigError("model.kwargs.negative_prompt: FLUX.1 is guidance-distilled and takes no negative "
                              "prompt; remove it (guidance_scale sets the guidance embedding)")
        self.max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        if self.max_sequence_length > 512:
            raise ConfigError(f"model.kwargs.max_sequence_length must be <= 512 for FLUX, got {max_sequence_length}")
        src, dt = self.source, self.weight_dtype
        self.transformer = load_component(FluxTransformer2DModel, src, "transformer", dt)
        vae = load_component(AutoencoderKL, src, "vae", dt)
        text = FluxPipeline(scheduler=None, vae=None, transformer=None,
                            text_encoder=load_component(CLIPTextModel, src, "text_encoder", dt),
                            tokenizer=load_component(AutoTokenizer, src, "tokenizer"),
                            text_encoder_2=load_component(T5EncoderModel, src, "text_encoder_2", dt),
                            tokenizer_2=load_component(AutoTokenizer, src, "tokenizer_2"))
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, src, "scheduler")
        self._freeze(vae, text.text_encoder, text.text_encoder_2)
        self.frozen = Frozen(vae=vae, text=text, scheduler_config=scheduler.config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        step = self.vae_scale_factor * 2  # latents must split into 2x2 patches
        default = 128 * self.vae_scale_factor  # the pipeline's default: 1024 px for FLUX.1
        self.height = self._check_size("height", default if height is None else height, step)
        self.width = self._check_size("width", default if width is None else width, step)
        self.set_checkpointing(*self._checkpointing)

    # ------------------------------------------------------------------ GenerativeModel
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config.in_channels // 4
        return (c, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    def _text_encoders(self):
        return [self.frozen.text.text_encoder, self.frozen.text.text_encoder_2]

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.frozen.text.encode_prompt(prompt=prompts, device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity (B, C, h, w) at ``timesteps`` = 1000 sigma (FLUX is fed sigma)."""
        b, _, h, w = latents.shape
        dtype, device = self.weight_dtype, latents.device  # ModelMixin.dtype walks the parameters: slow
        embeds = cond["prompt_embeds"].to(device, dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=device, dtype=torch.float32)
        out = self.transformer(hidden_states=pack(latents.to(dtype)), timestep=timesteps.to(device, dtype) / 1000,
                               guidance=guidance, pooled_projections=cond["pooled"].to(device, dtype),
                               encoder_hidden_states=embeds,
                               txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
                               img_ids=image_ids(h, w, device, dtype), return_dict=False)[0]
        return unpack(out, h, w)

    # ------------------------------------------------------------------ schedule
    def scheduler_sampler(self, num_steps: int, eta: float, variant: str = "dance"):
        """FLUX's own schedule: sigmas linspace(1, 1/N) shifted by the scheduler (resolution-
        dependent mu with dynamic shifting, as FluxPipeline computes it), then 0."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.frozen.scheduler_config)
        cfg = scheduler.config
        _, h, w = self.latent_shape()
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if cfg.get("use_flow_sigmas", False):
            return flow_sampler_from_scheduler(scheduler, num_steps, eta, variant, num_inference_steps=num_steps, mu=mu)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        return flow_sampler_from_scheduler(scheduler, num_steps, eta, variant, sigmas=sigmas, mu=mu)

    def _checkpoint_units(self):
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)


def build_flux(path: str | None = None, **kwargs) -> FluxModel:
    """FLUX.1 from a diffusers pipeline folder (or a cached hub id): ``model.kwargs.path``."""
    return build(FluxModel, "flux", path, kwargs)
