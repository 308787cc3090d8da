"""What the diffusers adapters share: loading, frozen components, devices, activation
checkpointing, LoRA / full-weight export and samplers built from a pipeline's own scheduler.

Module tree: only the denoiser (``transformer`` or ``unet``) is a registered submodule of an
adapter. Text encoders, tokenizers and the VAE live in a :class:`Frozen` holder outside it, so
they have no parameter in ``parameters()`` (no gradient, no optimizer state), are not in
``state_dict()`` (checkpoints hold the denoiser only), are out of LoRA's reach, and a deep copy
of the adapter (the KL reference without LoRA) shares them instead of copying gigabytes.
They follow the denoiser's device when used (``offload_text_encoders`` moves the encoders back
to the CPU after each encoding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...trainer.config import ConfigError
from ..interface import Conditioning

__all__ = ["Frozen", "DiffusersAdapter", "build", "parse_dtype", "load_component", "flow_sampler_from_scheduler"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
CHECKPOINTING_MODES = ("none", "full", "selective")
_MARK = "_dancegrpo_recompute"


class Frozen:
    """Components held outside the module tree; ``copy.deepcopy`` shares them (they never train)."""

    def __init__(self, **items):
        self.__dict__.update(items)

    def __deepcopy__(self, memo):
        return self


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConfigError(f"model.kwargs.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def resolve_source(path) -> str:
    """A local pipeline folder, or a hub id (``org/name``) left to diffusers' cache."""
    if not isinstance(path, str) or not path:
        raise ConfigError("model.kwargs.path must name a diffusers pipeline folder (or a cached hub id 'org/name')")
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model.kwargs.path {path!r} is not a diffusers pipeline folder")
    return path


def load_component(cls, source: str, subfolder: str, dtype: torch.dtype | None = None):
    """``cls.from_pretrained(source, subfolder=...)``; a missing or unreadable part is one line."""
    local = Path(source).is_dir()
    if local and not (Path(source) / subfolder).is_dir():
        raise FileNotFoundError(f"model.kwargs.path {source!r} has no {subfolder}/ folder (needed: {cls.__name__})")
    kwargs = {}
    if dtype is not None:
        # diffusers models take torch_dtype, transformers 5 models take dtype
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"model.kwargs.path: cannot load {subfolder}/ ({cls.__name__}) from {source!r}: "
                                f"{first}") from exc


def positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.kwargs.{key} must be a positive integer, got {value!r}")
    return value


def text_arg(key: str, value) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"model.kwargs.{key} must be a string, got {value!r}")
    return value


def _finite(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"model.kwargs.{key} must be a finite number, got {value!r}")
    return float(value)


def build(cls, name: str, path, kwargs: dict):
    """``cls(path, **kwargs)``, with an unknown key named in one line (and the close matches)."""
    import difflib
    import inspect

    known = set()
    for klass in (cls, DiffusersAdapter):
        known |= {k for k, v in inspect.signature(klass.__init__).parameters.items()
                  if v.kind is v.KEYWORD_ONLY}
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown model.kwargs key {key!r} for model {name!r}{hint}")
    return cls(path, **kwargs)


# --------------------------------------------------------------------------- activation checkpointing
# diffusers calls ``module._gradient_checkpointing_func(block, *args)`` for each block when a model's
# gradient checkpointing is on and grad is enabled. These replace its default: recompute only in
# training mode (like our DiT), and under "selective" only the marked blocks. Module-level
# functions so a deep copy of the model (the KL reference) does not call back into the policy.


def _recompute_all(module, *args, **kwargs):
    if module.training:
        return checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


def _recompute_marked(module, *args, **kwargs):
    if module.training and getattr(module, _MARK, False):
        return checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)
    return module(*args, **kwargs)


# --------------------------------------------------------------------------- schedules


def flow_sampler_from_scheduler(scheduler, num_steps: int, eta: float, variant: str, **set_timesteps_kwargs):
    """A FlowSampler on exactly the sigmas and timesteps ``scheduler.set_timesteps`` gives."""
    from ...samplers import FlowSampler

    scheduler.set_timesteps(**set_timesteps_kwargs)
    if len(scheduler.timesteps) != num_steps:
        raise ConfigError(f"the pipeline's scheduler made {len(scheduler.timesteps)} steps, not sampler.num_steps "
                          f"= {num_steps}")
    return FlowSampler(num_steps, eta=eta, variant=variant, sigmas=scheduler.sigmas, timesteps=scheduler.timesteps)


# --------------------------------------------------------------------------- the adapter base


class DiffusersAdapter(nn.Module):
    """A diffusers denoiser with its frozen text encoders and VAE, as a ``GenerativeModel``.

    Subclasses set ``denoiser_name`` (the attribute holding the trained network, and diffusers'
    LoRA prefix), ``lora_target_modules`` (peft suffixes used when ``lora.target_modules`` is
    empty), ``pipeline_class`` (for LoRA files) and implement ``_encode``, ``predict``,
    ``latent_shape``, ``_checkpoint_units`` and ``scheduler_sampler``.
    """

    prediction = "velocity"
    denoiser_name = "transformer"
    lora_target_modules: tuple[str, ...] = ()
    pipeline_class = None

    def __init__(self, path, *, dtype="float32", guidance_scale: float, checkpointing: str = "none",
                 checkpoint_every: int = 2, offload_text_encoders: bool = False, offload_vae: bool = False,
                 decode_batch_size: int = 8, export_full_weights: bool = True):
        super().__init__()
        self.source = resolve_source(path)
        self.weight_dtype = parse_dtype(dtype)
        self.guidance_scale = _finite("guidance_scale", guidance_scale)
        self.decode_batch_size = positive_int("decode_batch_size", decode_batch_size)
        for key, value in (("offload_text_encoders", offload_text_encoders), ("offload_vae", offload_vae),
                           ("export_full_weights", export_full_weights)):
            if not isinstance(value, bool):
                raise ConfigError(f"model.kwargs.{key} must be true or false, got {value!r}")
        self.offload_text_encoders = offload_text_encoders
        self.offload_vae = offload_vae
        self.export_full_weights = export_full_weights
        self._checkpointing = (checkpointing, checkpoint_every)

    # ------------------------------------------------------------------ plumbing
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def _follow(self, *modules) -> None:
        """Put frozen ``modules`` on the denoiser's device."""
        device = self.device
        for m in modules:
            if m is not None and next(m.parameters()).device != device:
                m.to(device)

    def _freeze(self, *modules) -> None:
        for m in modules:
            if m is not None:
                m.requires_grad_(False)
                m.eval()

    def _check_size(self, key: str, value, multiple: int) -> int:
        value = positive_int(key, value)
        if value % multiple:
            raise ConfigError(f"model.kwargs.{key} must be a multiple of {multiple} for {type(self).__name__}, "
                              f"got {value}")
        return value

    # ------------------------------------------------------------------ GenerativeModel
    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> Conditioning:
        """Text conditioning, computed once per prompt (the trainer repeats it for a group)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        if images is not None:
            raise ValueError(f"{type(self).__name__} is a text-to-image model: it takes no images")
        return self._encode_texts(list(prompts))

    def _encode_texts(self, prompts: list[str]) -> Conditioning:
        encoders = self._text_encoders()
        self._follow(*encoders)
        try:
            with torch.no_grad():
                cond = self._encode(prompts)
        finally:
            if self.offload_text_encoders:
                for m in encoders:
                    if m is not None:
                        m.to("cpu")
        return {k: v.detach() for k, v in cond.items()}

    def release_vae(self) -> None:
        """With ``offload_vae``, move the VAE back to the CPU (after decoding or encoding a first
        frame), so that it holds no accelerator memory while the denoiser trains."""
        if self.offload_vae:
            self.frozen.vae.to("cpu")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1], fp32, decoded ``decode_batch_size`` samples at a time."""
        self._follow(self.frozen.vae)
        outs = []
        try:
            with torch.no_grad():
                for chunk in latents.split(self.decode_batch_size):
                    img = self._vae_decode(chunk.to(self.device, self.weight_dtype))
                    outs.append((img.float() / 2 + 0.5).clamp(0, 1))
        finally:
            self.release_vae()
        return torch.cat(outs)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of sampler-space latents (undo the VAE's latent scaling and shift)."""
        vae = self.frozen.vae
        scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents / scale + shift, return_dict=False)[0]

    # ------------------------------------------------------------------ classifier-free guidance
    @property
    def real_cfg(self) -> bool:
        """Whether ``predict`` runs real CFG (the pipelines' rule: guidance_scale > 1)."""
        return self.guidance_scale > 1

    def _negative(self) -> Conditioning:
        """The negative prompt's conditioning, encoded once and kept (it never changes)."""
        if getattr(self.frozen, "negative", None) is None:
            self.frozen.negative = self._encode_texts([self.negative_prompt])
        return self.frozen.negative

    def _cfg_inputs(self, latents, timesteps, cond: Conditioning, dtype):
        """(latents, timesteps, cond) with the unconditional half first when CFG is on, as the
        pipelines batch it: one forward of 2B samples."""
        device = latents.device
        cond = {k: v.to(device, dtype) for k, v in cond.items()}
        if not self.real_cfg:
            return latents, timesteps, cond
        b = latents.shape[0]
        neg = {k: v.to(device, dtype).expand(b, *v.shape[1:]) for k, v in self._negative().items()}
        return (torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                {k: torch.cat([neg[k], cond[k]]) for k in cond})

    def _cfg_combine(self, out: torch.Tensor) -> torch.Tensor:
        if not self.real_cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    # ------------------------------------------------------------------ activation checkpointing
    def set_checkpointing(self, mode: str, every: int = 2) -> None:
        """Activation checkpointing of the denoiser's blocks, as our DiT's: "none", "full" (every
        block) or "selective" (units 0, every, 2*every, ... of ``_checkpoint_units()``: forward
        order for the transformers, module order for the UNet). Acts only in training mode with
        grad enabled."""
        if mode not in CHECKPOINTING_MODES:
            raise ConfigError(f"model.kwargs.checkpointing must be one of {list(CHECKPOINTING_MODES)}, got {mode!r}")
        positive_int("checkpoint_every", every)
        units = self._checkpoint_units()
        for i, unit in enumerate(units):
            setattr(unit, _MARK, mode == "full" or i % every == 0)
        if mode == "none":
            self.denoiser.disable_gradient_checkpointing()
        else:
            self.denoiser.enable_gradient_checkpointing(_recompute_all if mode == "full" else _recompute_marked)
        self._checkpointing = (mode, every)

    def checkpointed_units(self) -> list[int]:
        """Indices (into ``_checkpoint_units()``) of the blocks recomputed in backward."""
        mode, _ = self._checkpointing
        if mode == "none":
            return []
        return [i for i, u in enumerate(self._checkpoint_units()) if getattr(u, _MARK, False)]

    # ------------------------------------------------------------------ export
    def export_checkpoint(self, directory, lora: bool) -> None:
        """Diffusers-format weights in a checkpoint folder: ``lora/`` (for
        ``pipeline.load_lora_weights``) under LoRA, else ``<denoiser>/`` (for the family's
        ``from_pretrained``) unless ``export_full_weights`` is false."""
        directory = Path(directory)
        if lora:
            self.save_lora(directory / "lora")
        elif self.export_full_weights:
            self.denoiser.save_pretrained(directory / self.denoiser_name, safe_serialization=True)

    def save_lora(self, directory) -> None:
        """The LoRA adapters in diffusers' format (``pytorch_lora_weights.safetensors``)."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import get_peft_model_state_dict

        config = getattr(self, "peft_config", {}).get("default")
        if config is None:
            raise ValueError(f"{type(self).__name__} has no LoRA adapter to save")
        prefix = self.denoiser_name + "."
        state = {k[len(prefix):]: v.detach().cpu().contiguous()
                 for k, v in get_peft_model_state_dict(self, adapter_name="default").items()}
        targets = sorted(n[len(prefix):] for n, m in self.named_modules()
                         if isinstance(m, LoraLayer) and n.startswith(prefix))
        metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                    "target_modules": targets, "use_rslora": config.use_rslora, "bias": config.bias}
        self.pipeline_class.save_lora_weights(directory, **{f"{self.denoiser_name}_lora_layers": state,
                                                             f"{self.denoiser_name}_lora_adapter_metadata": metadata})

    # ------------------------------------------------------------------ family hooks
    def _text_encoders(self) -> list[nn.Module]:
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def _checkpoint_units(self) -> list[nn.Module]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"source={self.source!r}, dtype={self.weight_dtype}, guidance_scale={self.guidance_scale}"
