"""Building the pieces of a run from its config, and putting a checkpoint's weights into a model.

Shared by the trainer and by ``dancegrpo sample`` / ``dancegrpo eval``, so a checkpoint is
always rebuilt the way it was trained (same registry names, LoRA or not, then its weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from ..registry import build_model
from ..samplers import build_sampler
from .config import TrainConfig
from .lora import apply_lora

__all__ = ["resolve_device", "build_policy", "build_run_sampler", "trainable_state", "load_model_state",
           "load_trained_policy"]

log = logging.getLogger("dancegrpo.trainer")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
    return device


def build_policy(cfg: TrainConfig, device: torch.device, model=None):
    """The model of ``cfg`` (or the given one) on ``device``, with LoRA adapters when enabled."""
    if model is None:
        model = build_model(cfg.model.name, **cfg.model.kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the trainer needs a GenerativeModel that is a torch.nn.Module, got {type(model).__name__}")
    for attr in ("latent_shape", "encode_prompts", "predict", "decode"):
        if not callable(getattr(model, attr, None)):
            raise TypeError(f"model {type(model).__name__} lacks GenerativeModel.{attr}()")
    model = model.to(device)
    if cfg.lora.enabled:
        model.requires_grad_(False)
        model = apply_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model.eval()
    return model


def build_run_sampler(cfg: TrainConfig, model):
    s = cfg.sampler
    return build_sampler(s.kind, model, num_steps=s.num_steps, eta=s.eta, shift=s.shift, variant=s.variant,
                         num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                         steps_offset=s.steps_offset)


def trainable_state(model: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: only the adapters under LoRA (the base is rebuilt), else everything."""
    if lora:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    """Load ``trainable_state`` output back; every expected key must be there and nothing else."""
    if lora:
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, extra = expected - set(state), set(state) - expected
        if missing or extra:
            raise ValueError(f"LoRA checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        model.load_state_dict(state, strict=False)
    else:
        model.load_state_dict(state, strict=True)


def load_trained_policy(checkpoint, device: str = "auto", use_ema: bool = False, overrides=()):
    """Rebuild a trained policy from a checkpoint (a step directory or a run's output_dir).

    Returns ``(model, cfg)``: the model in eval mode with the checkpoint's (or its EMA) weights.
    """
    from .checkpoint import CheckpointManager, resolve_checkpoint
    from .config import apply_overrides, config_from_dict

    path = resolve_checkpoint(checkpoint)
    ckpt = CheckpointManager.load(path)
    data = yaml.safe_load(ckpt["config_yaml"]) or {}
    cfg = config_from_dict(apply_overrides(data, overrides)).validate()
    dev = resolve_device(device if device != "auto" else cfg.device)
    model = build_policy(cfg, dev)
    load_model_state(model, ckpt["model"], cfg.lora.enabled)
    if use_ema:
        if "ema" not in ckpt:
            raise ValueError(f"checkpoint {Path(path)} has no EMA weights (optim.ema_decay was 0)")
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, t in ckpt["ema"].items():
                params[n].copy_(t.to(params[n].dtype))
    log.info("loaded policy from %s (step %s%s)", path, ckpt["state"].get("step"), ", EMA" if use_ema else "")
    model.eval()
    return model, cfg
