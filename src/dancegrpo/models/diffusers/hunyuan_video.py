"""HunyuanVideo (text-to-video) and SkyReels-V1 (its image-to-video fine-tune) as
``GenerativeModel``s: rectified flow on a causal 3D VAE's latents, a Llama text encoder (its
third-to-last hidden state under the pipeline's prompt template, template tokens cropped) plus
CLIP's pooled embedding, and the distilled guidance embedding (fed ``1000 * scale``).

Latents are the VAE's ``(C, T, H/8, W/8)`` with ``T = (num_frames - 1) / 4 + 1`` (C = 16); the
transformer is fed ``timesteps`` = 1000 sigma as they are. ``decode`` returns the clip
(B, 3, num_frames, H, W) in [0, 1]; ``vae_tiling`` decodes it tile by tile (the full-size VAE
needs it on one GPU).

* ``hunyuanvideo``: ``guidance_scale`` is the guidance *embedding* (6.0 in the pipeline); the
  model is guidance-distilled and takes no negative prompt.
* ``skyreels_i2v``: the first frame's latent (VAE posterior mode, zero-padded in time) is
  stacked on the noise's channels; ``guidance_scale`` > 1 is true classifier-free guidance with
  ``negative_prompt`` (the pipeline's ``true_cfg_scale``, 6.0), ``embedded_guidance_scale`` the
  guidance embedding (1.0).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanSkyreelsImageToVideoPipeline,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

from ...trainer.config import ConfigError
from ..interface import Conditioning
from .common import (
    DiffusersAdapter,
    Frozen,
    _finite,
    build,
    flow_sampler_from_scheduler,
    load_component,
    positive_int,
    text_arg,
)
from .flux import ATTENTION

__all__ = ["HunyuanVideoModel", "SkyReelsI2VModel", "build_hunyuanvideo", "build_skyreels_i2v"]


class HunyuanVideoModel(DiffusersAdapter):
    prediction = "velocity"
    denoiser_name = "transformer"
    lora_target_modules = ATTENTION  # double blocks' image and text attention, single blocks' q/k/v
    pipeline_class = HunyuanVideoPipeline
    image_conditioned = False

    def __init__(self, path, *, dtype="float32", height: int = 720, width: int = 1280, num_frames: int = 129,
                 max_sequence_length: int = 256, guidance_scale: float = 6.0, negative_prompt: str | None = None,
                 vae_tiling: bool = False, **common):
        super().__init__(path, dtype=dtype, guidance_scale=guidance_scale, **common)
        self._set_guidance(negative_prompt)
        self.max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        if not isinstance(vae_tiling, bool):
            raise ConfigError(f"model.kwargs.vae_tiling must be true or false, got {vae_tiling!r}")
        src, dt = self.source, self.weight_dtype
        self.transformer = load_component(HunyuanVideoTransformer3DModel, src, "transformer", dt)
        vae = load_component(AutoencoderKLHunyuanVideo, src, "vae", dt)
        if vae_tiling:
            vae.enable_tiling()
        # sizes are checked before the text encoders load (the Llama encoder is 15 GB)
        self.spatial, self.temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
        step = max(16, self.spatial * self.transformer.config.patch_size)  # the pipeline asks for 16
        self.height = self._check_size("height", height, step)
        self.width = self._check_size("width", width, step)
        self.num_frames = positive_int("num_frames", num_frames)
        if (self.num_frames - 1) % self.temporal:
            raise ConfigError(f"model.kwargs.num_frames must be {self.temporal}k+1 (the VAE compresses time "
                              f"{self.temporal}x), got {num_frames}")
        text = self.pipeline_class(scheduler=None, vae=None, transformer=None,
                                   text_encoder=load_component(LlamaModel, src, "text_encoder", dt),
                                   tokenizer=load_component(AutoTokenizer, src, "tokenizer"),
                                   text_encoder_2=load_component(CLIPTextModel, src, "text_encoder_2", dt),
                                   tokenizer_2=load_component(AutoTokenizer, src, "tokenizer_2"))
        scheduler = load_component(FlowMatchEulerDiscreteScheduler, src, "scheduler")
        self._freeze(vae, text.text_encoder, text.text_encoder_2)
        self.frozen = Frozen(vae=vae, text=text, scheduler_config=scheduler.config, negative=None)
        self.set_checkpointing(*self._checkpointing)

    def _set_guidance(self, negative_prompt) -> None:
        if negative_prompt:
            raise ConfigError("model.kwargs.negative_prompt: HunyuanVideo is guidance-distilled and takes no "
                              "negative prompt; remove it (guidance_scale sets the guidance embedding)")
        self.embedded_guidance = self.guidance_scale

    @property
    def real_cfg(self) -> bool:
        return False

    # ------------------------------------------------------------------ GenerativeModel
    def latent_shape(self) -> tuple[int, int, int, int]:
        c = self.transformer.config.out_channels
        return (c, (self.num_frames - 1) // self.temporal + 1, self.height // self.spatial, self.width // self.spatial)

    def encode_prompts(self, prompts, images: torch.Tensor | None = None) -> Conditioning:
        if images is not None:
            raise ValueError("hunyuanvideo is a text-to-video model: it takes no images (skyreels_i2v takes a "
                             "first frame)")
        return super().encode_prompts(prompts)

    def _text_encoders(self):
        return [self.frozen.text.text_encoder, self.frozen.text.text_encoder_2]

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, mask = self.frozen.text.encode_prompt(prompt=prompts, device=self.device,
                                                              max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled": pooled, "prompt_mask": mask}

    def _inputs(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's input channels for ``latents`` (T2V: the latents themselves)."""
        return latents

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity (B, C, T, h, w) at ``timesteps`` = 1000 sigma (with CFG when on)."""
        dtype, device = self.weight_dtype, latents.device  # ModelMixin.dtype walks the parameters: slow
        x = self._inputs(latents, cond).to(dtype)
        text = {k: cond[k] for k in ("prompt_embeds", "pooled", "prompt_mask")}
        x, t, c = self._cfg_inputs(x, timesteps.to(device), text, dtype)
        guidance = torch.full((x.shape[0],), 1000.0 * self.embedded_guidance, device=device, dtype=dtype)
        out = self.transformer(hidden_states=x, timestep=t.float(), encoder_hidden_states=c["prompt_embeds"],
                               encoder_attention_mask=c["prompt_mask"], pooled_projections=c["pooled"],
                               guidance=guidance, return_dict=False)[0]
        return self._cfg_combine(out)

    # ------------------------------------------------------------------ schedule
    def scheduler_sampler(self, num_steps: int, eta: float, variant: str = "dance"):
        """The pipeline's schedule: sigmas linspace(1, 0, N + 1)[:-1] shifted by the scheduler's
        ``shift`` (flow_shift), then 0."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.frozen.scheduler_config)
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        return flow_sampler_from_scheduler(scheduler, num_steps, eta, variant, sigmas=sigmas)

    def _checkpoint_units(self):
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)


class SkyReelsI2VModel(HunyuanVideoModel):
    pipeline_class = HunyuanSkyreelsImageToVideoPipeline
    image_conditioned = True

    def __init__(self, path, *, dtype="float32", height: int = 544, width: int = 960, num_frames: int = 97,
                 max_sequence_length: int = 256, guidance_scale: float = 6.0, embedded_guidance_scale: float = 1.0,
                 negative_prompt: str = "", vae_tiling: bool = False, **common):
        self._embedded = embedded_guidance_scale
        super().__init__(path, dtype=dtype, height=height, width=width, num_frames=num_frames,
                         max_sequence_length=max_sequence_length, guidance_scale=guidance_scale,
                         negative_prompt=negative_prompt, vae_tiling=vae_tiling, **common)
        c = self.transformer.config
        if c.in_channels != 2 * c.out_channels:
            raise ConfigError(f"model.kwargs.path {self.source!r}: not an image-to-video (SkyReels) transformer "
                              f"(in_channels {c.in_channels}, expected 2 x {c.out_channels})")

    def _set_guidance(self, negative_prompt) -> None:
        self.negative_prompt = text_arg("negative_prompt", negative_prompt)
        self.embedded_guidance = _finite("embedded_guidance_scale", self._embedded)

    @property
    def real_cfg(self) -> bool:
        return self.guidance_scale > 1

    def encode_prompts(self, prompts, images: torch.Tensor | None = None) -> Conditioning:
        """Text conditioning and the first frame's latent (B, C, 1, h, w), once per prompt."""
        if images is None:
            raise ValueError("skyreels_i2v is an image-to-video model: give each prompt a first-frame image "
                             "(data: prompt_file with task: i2v)")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"images must be (B, 3, H, W) with B = {len(prompts)} prompts, got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"first-frame images are {tuple(images.shape[-2:])}, the model makes "
                             f"{(self.height, self.width)}: set data.kwargs.image_size: [{self.height}, {self.width}]")
        cond = self._encode_texts(list(prompts))
        vae = self.frozen.vae
        self._follow(vae)
        try:
            with torch.no_grad():
                pixels = (images.to(self.device, self.weight_dtype) * 2 - 1).unsqueeze(2)
                cond["image_latents"] = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        finally:
            self.release_vae()
        return cond

    def _inputs(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Noise and the first frame's latent, zero-padded to T frames, stacked on channels."""
        image = cond["image_latents"].to(latents.device, latents.dtype)
        pad = image.new_zeros(image.shape[0], image.shape[1], latents.shape[2] - 1, *image.shape[3:])
        return torch.cat([latents, torch.cat([image, pad], dim=2)], dim=1)


def build_hunyuanvideo(path: str | None = None, **kwargs) -> HunyuanVideoModel:
    """HunyuanVideo (T2V) from a diffusers pipeline folder (or a cached hub id): ``model.kwargs.path``."""
    return build(HunyuanVideoModel, "hunyuanvideo", path, kwargs)


def build_skyreels_i2v(path: str | None = None, **kwargs) -> SkyReelsI2VModel:
    """SkyReels-V1 (HunyuanVideo I2V) from a diffusers pipeline folder: ``model.kwargs.path``."""
    return build(SkyReelsI2VModel, "skyreels_i2v", path, kwargs)
