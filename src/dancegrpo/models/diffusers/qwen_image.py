"""Qwen-Image as a ``GenerativeModel``: rectified flow (MM-DiT on 2x2-packed latents), a
Qwen2.5-VL text encoder (its last hidden state under the pipeline's prompt template), a 3D
causal VAE with per-channel latent statistics, and true classifier-free guidance with the
output-norm rescale the pipeline applies (``guidance_scale`` > 1 is the pipeline's
``true_cfg_scale``; ``negative_prompt``, default " ").

Latents are the VAE's ``(C, H/8, W/8)`` (C = 16 for Qwen-Image, one frame dropped): noise,
trajectories and log-probs live in that shape, and ``predict`` packs 2x2 patches into tokens
(FLUX's packing) and unpacks the velocity. The transformer is fed ``sigma`` (``timesteps / 1000``).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

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
from .flux import ATTENTION, pack, unpack

__all__ = ["QwenImageModel", "build_qwen_image"]

MAX_SEQUENCE_LENGTH = 1024  # the pipeline's limit


def _pad_text(cond: Conditioning, length: int) -> Conditioning:
    """Text embeddings and mask zero-padded (mask False) to ``length`` tokens."""
    embeds, mask = cond["prompt_embeds"], cond["prompt_mask"]
    extra = length - embeds.shape[1]
    if extra == 0:
        return cond
    return {"prompt_embeds": torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], 1),
            "prompt_mask": torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)}


class QwenImageModel(DiffusersAdapter):
    prediction = "velocity"
    denoiser_name = "transformer"
    lora_target_modules = ATTENTION  # image and text streams' attention projections, as for FLUX / SD3
    pipeline_class = QwenImagePipeline

    def __init__(self, path, *, dtype="float32", height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 512, guidance_scale: float = 4.0, negative_prompt: str = " ", **common):
        super().__init__(path, dtype=dtype, guidance_scale=guidance_scale, **common)
        self.negative_prompt = text_arg("negative_prompt", negative_prompt)
        self.max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        if self.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ConfigError(f"model.kwargs.max_sequence_length must be <= {MAX_SEQUENCE_LENGTH} for Qwen-Image, "
                              f"got {max_sequence_length}")
        src, dt = self.source, self.weight_dtype
        self.transformer = load_component(QwenImageTransformer2DModel, src, "transformer", dt)
        if self.transformer.config.guidance_embeds:
            raise ConfigError(f"model.kwargs.path {src!r}: a guidance-distilled Qwen-Image transformer "
                              "(guidance_embeds) is not supported")
        vae = load_component(AutoencoderKLQwenImage, src, "vae", dt)
        text = QwenImagePipeline(scheduler=None, vae=None, transformer=None,
                                 text_encoder=load_component(Qwen2_5_VLForConditionalGeneration, src, "text_encoder",
                                                             dt),
                                 tokenizer=load_component(AutoTokenizer, src, "tokenizer"))
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, src, "scheduler")
        self._freeze(vae, text.text_encoder)
        self.frozen = Frozen(vae=vae, text=text, scheduler_config=scheduler.config, negative=None)
        self.vae_scale_factor = 2 ** len(vae.config.temperal_downsample)
        step = self.vae_scale_factor * 2  # latents must split into 2x2 patches
        default = text.default_sample_size * self.vae_scale_factor  # the pipeline's default: 1024 px
        self.height = self._check_size("height", default if height is None else height, step)
        self.width = self._check_size("width", default if width is None else width, step)
        self.set_checkpointing(*self._checkpointing)

    # ------------------------------------------------------------------ GenerativeModel
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.transformer.config.in_channels // 4
        return (c, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    def _text_encoders(self):
        return [self.frozen.text.text_encoder]

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.frozen.text.encode_prompt(prompt=prompts, device=self.device,
                                                      max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask; the trainer keeps a tensor
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_mask": mask.bool()}

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the per-channel latent normalisation; the VAE decodes one frame."""
        cfg = self.frozen.vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return self.frozen.vae.decode((latents * std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0]

    def _cfg_inputs(self, latents, timesteps, cond: Conditioning, dtype):
        """Text padded to one length (padding masked out), and with CFG the negative prompt's
        half first: one forward of 2B samples where the pipeline runs two of B."""
        device = latents.device
        cond = {"prompt_embeds": cond["prompt_embeds"].to(device, dtype), "prompt_mask": cond["prompt_mask"].to(device)}
        if not self.real_cfg:
            return latents, timesteps, cond
        b = latents.shape[0]
        neg = {k: v.to(device).expand(b, *v.shape[1:]) for k, v in self._negative().items()}
        neg["prompt_embeds"] = neg["prompt_embeds"].to(dtype)
        length = max(neg["prompt_embeds"].shape[1], cond["prompt_embeds"].shape[1])
        neg, cond = _pad_text(neg, length), _pad_text(cond, length)
        return (torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                {k: torch.cat([neg[k], cond[k]]) for k in cond})

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided velocity (B, C, h, w) at ``timesteps`` = 1000 sigma."""
        _, _, h, w = latents.shape
        dtype = self.weight_dtype  # ModelMixin.dtype walks the parameters: slow
        x, t, c = self._cfg_inputs(pack(latents.to(dtype)), timesteps.to(latents.device), cond, dtype)
        mask = c["prompt_mask"]
        out = self.transformer(hidden_states=x, timestep=t.to(dtype) / 1000, encoder_hidden_states=c["prompt_embeds"],
                               encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                               img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], return_dict=False)[0]
        if self.real_cfg:
            uncond, text = out.chunk(2)
            guided = uncond + self.guidance_scale * (text - uncond)
            # the pipeline rescales each token's guided velocity to the conditional one's norm
            out = guided * (torch.linalg.vector_norm(text, dim=-1, keepdim=True)
                            / torch.linalg.vector_norm(guided, dim=-1, keepdim=True))
        return unpack(out, h, w)

    # ------------------------------------------------------------------ schedule
    def scheduler_sampler(self, num_steps: int, eta: float, variant: str = "dance"):
        """Qwen-Image's own schedule: sigmas linspace(1, 1/N) through the scheduler (its
        resolution-dependent mu, exponential time shift and terminal shift), then 0."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.frozen.scheduler_config)
        cfg = scheduler.config
        _, h, w = self.latent_shape()
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        return flow_sampler_from_scheduler(scheduler, num_steps, eta, variant, sigmas=sigmas, mu=mu)

    def _checkpoint_units(self):
        return list(self.transformer.transformer_blocks)


def build_qwen_image(path: str | None = None, **kwargs) -> QwenImageModel:
    """Qwen-Image from a diffusers pipeline folder (or a cached hub id): ``model.kwargs.path``."""
    return build(QwenImageModel, "qwen_image", path, kwargs)
