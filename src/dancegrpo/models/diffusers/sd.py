"""Stable Diffusion 1.x / 2.x as a ``GenerativeModel``: a UNet on ``(4, H/8, W/8)`` latents,
one CLIP text encoder, real classifier-free guidance with both halves in one forward
(``guidance_scale`` > 1; ``negative_prompt``, default empty) and DDIM sampling with noise eta.

``predict`` returns epsilon whatever the checkpoint predicts: a v-prediction UNet (SD 2.x 768)
is converted with ``eps = sqrt(ab_t) v + sqrt(1 - ab_t) x``, exactly as DDIM converts it, so the
DDIM sampler and its log-probs serve both. The schedule (alpha-bars, timestep spacing) comes from
the folder's scheduler config read as DDIM, with the pipeline's own corrections (steps_offset 1,
no sample clipping), as DanceGRPO's SD training does.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from transformers import AutoTokenizer, CLIPTextModel

from ...trainer.config import ConfigError
from ..interface import Conditioning
from .common import DiffusersAdapter, Frozen, build, load_component, text_arg

__all__ = ["SDModel", "build_sd"]

PREDICTIONS = ("epsilon", "v_prediction")


class SDModel(DiffusersAdapter):
    prediction = "epsilon"
    denoiser_name = "unet"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections (DDPO)
    pipeline_class = StableDiffusionPipeline

    def __init__(self, path, *, dtype="float32", height: int | None = None, width: int | None = None,
                 guidance_scale: float = 7.5, negative_prompt: str = "", **common):
        super().__init__(path, dtype=dtype, guidance_scale=guidance_scale, **common)
        self.negative_prompt = text_arg("negative_prompt", negative_prompt)
        src, dt = self.source, self.weight_dtype
        self.unet = load_component(UNet2DConditionModel, src, "unet", dt)
        vae = load_component(AutoencoderKL, src, "vae", dt)
        text = StableDiffusionPipeline(vae=None, unet=None, scheduler=None, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False,
                                       text_encoder=load_component(CLIPTextModel, src, "text_encoder", dt),
                                       tokenizer=load_component(AutoTokenizer, src, "tokenizer"))
        scheduler = self._ddim(load_component(DDIMScheduler, src, "scheduler").config)
        self.frozen = Frozen(vae=vae, text=text, scheduler_config=scheduler.config, negative=None)
        self._freeze(vae, text.text_encoder)
        self.v_prediction = scheduler.config.prediction_type == "v_prediction"
        # fp32 alpha-bars as DDIM holds them; as float64 for the sampler (`sampler.kind: ddim`)
        self.register_buffer("_alphas_cumprod", scheduler.alphas_cumprod.clone(), persistent=False)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        default = self.unet.config.sample_size * self.vae_scale_factor  # 512 px for SD 1.x
        self.height = self._check_size("height", default if height is None else height, self.vae_scale_factor)
        self.width = self._check_size("width", default if width is None else width, self.vae_scale_factor)
        self.set_checkpointing(*self._checkpointing)

    @staticmethod
    def _ddim(config) -> DDIMScheduler:
        """The folder's scheduler config as DDIM, corrected as StableDiffusionPipeline corrects it."""
        if config.get("prediction_type", "epsilon") not in PREDICTIONS:
            raise ConfigError(f"scheduler prediction_type must be one of {PREDICTIONS} for model 'sd', got "
                              f"{config.get('prediction_type')!r}")
        if config.get("thresholding", False):
            raise ConfigError("scheduler thresholding is not supported by model 'sd' (set it false in scheduler/)")
        return DDIMScheduler.from_config(config, steps_offset=1, clip_sample=False)

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.unet.config.in_channels, self.height // self.vae_scale_factor,
                self.width // self.vae_scale_factor)

    def _text_encoders(self):
        return [self.frozen.text.text_encoder]

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.frozen.text.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided epsilon (B, 4, h, w) at DDPM step ``timesteps``."""
        dtype = self.weight_dtype
        x, t, c = self._cfg_inputs(latents.to(dtype), timesteps.to(latents.device), cond, dtype)
        out = self._cfg_combine(self.unet(x, t, encoder_hidden_states=c["prompt_embeds"], return_dict=False)[0])
        if self.v_prediction:
            ab = self._alphas_cumprod.to(latents.device)[timesteps.long()].reshape(-1, 1, 1, 1)
            out = ab.sqrt() * out + (1 - ab).sqrt() * latents.to(out.dtype)
        return out

    def scheduler_sampler(self, num_steps: int, eta: float, variant: str = "dance"):
        """DDIM on the scheduler's own timesteps (its spacing and steps_offset) and alpha-bars."""
        from ...samplers import DDIMSampler

        scheduler = DDIMScheduler.from_config(self.frozen.scheduler_config)
        scheduler.set_timesteps(num_steps)
        return DDIMSampler(scheduler.alphas_cumprod, num_steps, eta, timesteps=scheduler.timesteps,
                           final_alpha_cumprod=float(scheduler.final_alpha_cumprod))

    def _checkpoint_units(self):
        """The units diffusers recomputes: every ResNet and transformer block, in module order."""
        return [m for m in self.unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]


def build_sd(path: str | None = None, **kwargs) -> SDModel:
    """SD 1.x / 2.x from a diffusers pipeline folder (or a cached hub id): ``model.kwargs.path``."""
    return build(SDModel, "sd", path, kwargs)
