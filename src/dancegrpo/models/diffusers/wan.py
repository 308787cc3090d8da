"""Wan 2.1 / 2.2 as ``GenerativeModel``s: ``wan`` (text-to-video, ``WanPipeline``) and ``wan_i2v``
(image-to-video, ``WanImageToVideoPipeline``, with Wan 2.1's CLIP image encoder).

Rectified flow on the Wan VAE's video latents ``(C, T, H/8, W/8)`` with ``T = (F - 1) / 4 + 1``
for ``F`` frames, in the pipelines' normalised space (``decode`` undoes the VAE's per-channel
``latents_mean`` / ``latents_std``). The transformer is fed ``timesteps`` (= 1000 sigma, or the
scheduler's own timesteps) as the pipelines do; UMT5 text embeddings are zero-padded to
``max_sequence_length``; real CFG runs both halves as one batch of 2B.

Image-to-video: the first frame is encoded once per prompt (the trainer repeats it for the
group) into the pipeline's two inputs: the VAE latents of the frame followed by zero frames,
behind a 4-channel first-frame mask, concatenated to the noisy latents on the channel axis
(``condition``), and, when the transformer has an image projection (Wan 2.1 I2V), the CLIP
vision encoder's penultimate hidden states (``image_embeds``).
"""

from __future__ import annotations

import diffusers
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

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

__all__ = ["WanModel", "WanI2VModel", "build_wan", "build_wan_i2v"]

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # self- and cross-attention of every block
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


def _config(cls, source: str, what: str, **kwargs) -> dict:
    try:
        return dict(cls.load_config(source, **kwargs))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"model.kwargs.path: cannot read {what} from {source!r}: {first}") from exc


class WanModel(DiffusersAdapter):
    prediction = "velocity"
    denoiser_name = "transformer"
    lora_target_modules = ATTENTION
    pipeline_class = WanPipeline
    task = "text-to-video"

    def __init__(self, path, *, dtype="float32", height: int = 480, width: int = 832, num_frames: int = 81,
                 max_sequence_length: int = 512, guidance_scale: float = 5.0, negative_prompt: str = "",
                 vae_tiling: bool = False, **common):
        super().__init__(path, dtype=dtype, guidance_scale=guidance_scale, **common)
        self.negative_prompt = text_arg("negative_prompt", negative_prompt)
        if not isinstance(vae_tiling, bool):
            raise ConfigError(f"model.kwargs.vae_tiling must be true or false, got {vae_tiling!r}")
        self.max_sequence_length = positive_int("max_sequence_length", max_sequence_length)
        src, dt = self.source, self.weight_dtype
        pipe_cfg = _config(self.pipeline_class, src, "model_index.json")
        if pipe_cfg.get("boundary_ratio") is not None or (pipe_cfg.get("transformer_2") or [None])[0]:
            raise ConfigError(f"model.kwargs.path {src!r}: two-expert Wan 2.2 pipelines (transformer_2, "
                              "boundary_ratio) are not supported; Wan 2.1 and Wan 2.2 TI2V-5B are")
        self.expand_timesteps = bool(pipe_cfg.get("expand_timesteps", False))
        sched_cfg = _config(FlowMatchEulerDiscreteScheduler, src, "scheduler/", subfolder="scheduler")
        # the pipeline instantiates the class model_index.json names, with scheduler/'s config
        sched_cfg["_class_name"] = (pipe_cfg.get("scheduler") or [None, sched_cfg.get("_class_name")])[1]
        if sched_cfg["_class_name"] not in SCHEDULERS:
            raise ConfigError(f"model.kwargs.path {src!r}: scheduler {sched_cfg['_class_name']!r} is not a "
                              f"flow scheduler this adapter follows ({', '.join(SCHEDULERS)})")
        # sizes are checked on the configs, before any weight is read
        vae_cfg = _config(AutoencoderKLWan, src, "vae/", subfolder="vae")
        self.transformer_config = _config(WanTransformer3DModel, src, "transformer/", subfolder="transformer")
        self.scale_t, self.scale_s = vae_cfg.get("scale_factor_temporal", 4), vae_cfg.get("scale_factor_spatial", 8)
        self.patch = tuple(self.transformer_config.get("patch_size", (1, 2, 2)))
        self.num_frames = positive_int("num_frames", num_frames)
        if (self.num_frames - 1) % self.scale_t:
            raise ConfigError(f"model.kwargs.num_frames must be {self.scale_t}k+1 (1, {self.scale_t + 1}, "
                              f"{2 * self.scale_t + 1}, ...) for the Wan VAE, got {num_frames}")
        self.height = self._check_size("height", height, self.scale_s * self.patch[1])
        self.width = self._check_size("width", width, self.scale_s * self.patch[2])
        self._check_transformer()
        self.transformer = load_component(WanTransformer3DModel, src, "transformer", dt)
        vae = load_component(AutoencoderKLWan, src, "vae", dt)
        if vae_tiling:
            vae.enable_tiling()
        text_encoder = load_component(UMT5EncoderModel, src, "text_encoder", dt)
        tokenizer = load_component(AutoTokenizer, src, "tokenizer")
        self.frozen = Frozen(vae=vae, text=self._text_pipeline(src, dt, vae, text_encoder, tokenizer),
                             scheduler_config=sched_cfg, negative=None)
        self._freeze(vae, *self._text_encoders())
        self.set_checkpointing(*self._checkpointing)

    def _check_transformer(self) -> None:
        c_in, c_out = self.transformer_config["in_channels"], self.transformer_config["out_channels"]
        if c_in != c_out:
            raise ConfigError(f"model.kwargs.path {self.source!r}: its transformer takes {c_in} channels "
                              f"for {c_out} latent ones: an image-to-video model (use model.name: wan_i2v)")

    def _text_pipeline(self, src, dtype, vae, text_encoder, tokenizer):
        return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=None, transformer=None)

    # ------------------------------------------------------------------ GenerativeModel
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.transformer.config.out_channels, (self.num_frames - 1) // self.scale_t + 1,
                self.height // self.scale_s, self.width // self.scale_s)

    def encode_prompts(self, prompts, images: torch.Tensor | None = None) -> Conditioning:
        if images is not None:
            raise ValueError(f"{type(self).__name__} is a text-to-video model: it takes no images (use wan_i2v)")
        return super().encode_prompts(prompts)

    def _text_encoders(self):
        return [self.frozen.text.text_encoder]

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.frozen.text.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length, device=self.device)
        return {"prompt_embeds": embeds}

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) in [-1, 1]: the pipeline's un-normalisation, then the VAE."""
        cfg = self.frozen.vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
        return self.frozen.vae.decode(latents / inv_std + mean, return_dict=False)[0]

    def _cfg_inputs(self, latents, timesteps, cond: Conditioning, dtype):
        """With CFG: the negative prompt's half first, sharing every non-text input (the image
        conditioning of I2V), as one batch of 2B (the pipelines run two forwards of B)."""
        device = latents.device
        cond = {k: v.to(device, dtype) for k, v in cond.items()}
        if not self.real_cfg:
            return latents, timesteps, cond
        b = latents.shape[0]
        neg = dict(cond)
        text = self._negative()["prompt_embeds"].to(device, dtype)
        neg["prompt_embeds"] = text.expand(b, *text.shape[1:])
        return (torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                {k: torch.cat([neg[k], cond[k]]) for k in cond})

    def _model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return latents

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Guided velocity (B, C, T, h, w) at ``timesteps`` (fed as they are, fp32)."""
        dtype = self.weight_dtype  # ModelMixin.dtype walks the parameters: slow
        x, t, c = self._cfg_inputs(latents.to(dtype), timesteps.to(latents.device, torch.float32), cond, dtype)
        if self.expand_timesteps:  # Wan 2.2 TI2V-5B: one timestep per token (all equal for T2V)
            _, _, f, h, w = x.shape
            t = t[:, None].expand(-1, (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2]))
        out = self.transformer(hidden_states=self._model_input(x, c), timestep=t,
                               encoder_hidden_states=c["prompt_embeds"],
                               encoder_hidden_states_image=c.get("image_embeds"), return_dict=False)[0]
        return self._cfg_combine(out)

    # ------------------------------------------------------------------ schedule
    def scheduler_sampler(self, num_steps: int, eta: float, variant: str = "dance"):
        """The folder's scheduler as the pipeline calls it (``set_timesteps(N)``): its shifted
        sigmas and its timesteps. For UniPC (the Wan releases' scheduler) the sampler takes its
        sigma grid and timesteps but steps with Euler / SDE, not UniPC's multistep corrector."""
        cfg = self.frozen.scheduler_config
        scheduler = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        if cfg["_class_name"] == "UniPCMultistepScheduler" and not cfg.get("use_flow_sigmas", False):
            raise ConfigError(f"model.kwargs.path {self.source!r}: its UniPC scheduler has no flow sigmas "
                              "(use_flow_sigmas)")
        return flow_sampler_from_scheduler(scheduler, num_steps, eta, variant, num_inference_steps=num_steps)

    def _checkpoint_units(self):
        return list(self.transformer.blocks)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, frames={self.num_frames}, size=({self.height}, {self.width}), "
                f"expand_timesteps={self.expand_timesteps}")


class WanI2VModel(WanModel):
    pipeline_class = WanImageToVideoPipeline
    task = "image-to-video"

    def _check_transformer(self) -> None:
        if self.expand_timesteps:
            raise ConfigError(f"model.kwargs.path {self.source!r}: Wan 2.2 TI2V-5B image-to-video (expand_timesteps) "
                              "is not supported; use it as text-to-video (model.name: wan)")
        c_in, c_out = self.transformer_config["in_channels"], self.transformer_config["out_channels"]
        if c_in != 2 * c_out + self.scale_t:
            raise ConfigError(f"model.kwargs.path {self.source!r}: its transformer takes {c_in} channels, "
                              f"not an image-to-video model's {2 * c_out + self.scale_t} (text-to-video: "
                              "use model.name: wan)")

    def _text_pipeline(self, src, dtype, vae, text_encoder, tokenizer):
        image_encoder = processor = None
        if self.transformer_config.get("image_dim") is not None:
            image_encoder = load_component(CLIPVisionModel, src, "image_encoder", dtype)
            processor = load_component(CLIPImageProcessor, src, "image_processor")
        return WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=None,
                                       image_encoder=image_encoder, image_processor=processor, transformer=None)

    def _text_encoders(self):
        return [m for m in (self.frozen.text.text_encoder, self.frozen.text.image_encoder) if m is not None]

    def encode_prompts(self, prompts, images: torch.Tensor | None = None) -> Conditioning:
        """Text, and the first frames (B, 3, H, W) in [0, 1], encoded once per prompt."""
        if images is None:
            raise ValueError("wan_i2v is an image-to-video model: every prompt needs a first-frame image "
                             "(data: prompt_file with a .jsonl of {\"prompt\", \"image\"} and task: i2v)")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(f"images must be ({len(prompts)}, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        cond = DiffusersAdapter.encode_prompts(self, prompts)
        cond.update(self._encode_images(images))
        return cond

    def _encode_images(self, images: torch.Tensor) -> Conditioning:
        from PIL import Image

        pipe, vae = self.frozen.text, self.frozen.vae
        self._follow(vae, *self._text_encoders())
        # the pipeline's preprocessing takes PIL images: 8-bit frames, as read from image files
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        pil = [Image.fromarray(p.numpy()) for p in pixels]
        out = {}
        try:
            with torch.no_grad():
                if pipe.image_encoder is not None:
                    out["image_embeds"] = pipe.encode_image(pil, self.device).detach()
                frame = pipe.video_processor.preprocess(pil, height=self.height, width=self.width)
                out["condition"] = self._condition(frame.to(self.device, torch.float32))
        finally:
            if self.offload_text_encoders:
                for m in self._text_encoders():
                    m.to("cpu")
            self.release_vae()
        return out

    def _condition(self, frame: torch.Tensor) -> torch.Tensor:
        """(B, 4 + C, T, h, w): the first-frame mask (its 4 sub-frames of latent frame 0 set),
        then the normalised VAE latents (mode) of the frame followed by F - 1 zero frames."""
        vae = self.frozen.vae
        b = frame.shape[0]
        video = torch.cat([frame.unsqueeze(2), frame.new_zeros(b, 3, self.num_frames - 1, *frame.shape[-2:])], 2)
        latents = vae.encode(video.to(self.weight_dtype)).latent_dist.mode().float()
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        latents = (latents - mean) * inv_std
        mask = torch.zeros(b, self.scale_t, *latents.shape[2:], device=latents.device)
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], 1)

    def _model_input(self, latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return torch.cat([latents, cond["condition"]], 1)


def build_wan(path: str | None = None, **kwargs) -> WanModel:
    """Wan 2.1 / 2.2 text-to-video from a diffusers ``WanPipeline`` folder: ``model.kwargs.path``."""
    return build(WanModel, "wan", path, kwargs)


def build_wan_i2v(path: str | None = None, **kwargs) -> WanI2VModel:
    """Wan image-to-video from a diffusers ``WanImageToVideoPipeline`` folder: ``model.kwargs.path``."""
    return build(WanI2VModel, "wan_i2v", path, kwargs)
