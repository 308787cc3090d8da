"""Building the pieces of a run from its config, and putting a checkpoint's weights into a model.

Shared by the trainer and by ``dancegrpo sample`` / ``dancegrpo eval``, so a checkpoint is
always rebuilt the way it was trained (same registry names, LoRA or not, then its weights).
Registry names and builder arguments are checked here, so a typo in a config is an error
naming its key rather than a traceback from deep inside a builder.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from ..errors import CheckpointError, ConfigError, DeviceError, UserError
from ..registry import DATASETS, MODELS, REWARDS
from ..samplers import build_sampler
from .config import TrainConfig
from .lora import apply_lora

__all__ = ["resolve_device", "build_policy", "build_run_sampler", "build_run_dataset", "build_named",
           "check_registered", "trainable_state", "load_model_state", "load_trained_policy"]

log = logging.getLogger("dancegrpo.trainer")

REGISTRIES = {"model": MODELS, "reward": REWARDS, "dataset": DATASETS}


def check_registered(kind: str, name, key: str) -> None:
    """ConfigError naming ``key`` unless ``name`` is in the ``kind`` registry (nothing imported)."""
    registry = REGISTRIES[kind]
    if name in registry.names():
        return
    try:
        registry.build(name)  # the registry's own "unknown ... (did you mean ...)" message
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    raise ConfigError(f"{key}: {name!r} is not a registered {kind}")


def build_named(kind: str, name, key: str, **kwargs):
    """Build registry entry ``name`` of ``kind`` ("model", "reward", "dataset"); ``key`` is the
    config key (or command-line option) the name came from, for the error messages."""
    check_registered(kind, name, key)
    registry = REGISTRIES[kind]
    try:  # arguments the builder does not take are a config mistake, not a bug in the builder
        inspect.signature(registry.resolve(name)).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}={name}: {exc} (check the kwargs given with it)") from None
    try:
        return registry.build(name, **kwargs)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        # A builder validating the values it was given from the config: the user's to fix. Only
        # this call is covered, so the same exceptions from training itself keep their traceback.
        raise ConfigError(f"{key}={name} with kwargs {kwargs}: {exc}") from exc


def build_run_dataset(cfg: TrainConfig, split: str):
    return build_named("dataset", cfg.data.name, "data.name", split=split, **cfg.data.kwargs)


def resolve_device(name: str) -> torch.device:
    """The torch device for the config's ``device``; DeviceError when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device={name} but MPS is not available here; use device=cpu or device=auto")
    return device


def build_policy(cfg: TrainConfig, device: torch.device, model=None):
    """The model of ``cfg`` (or the given one) on ``device``, with LoRA adapters when enabled."""
    if model is None:
        model = build_named("model", cfg.model.name, "model.name", **cfg.model.kwargs)
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
                         steps_offset=s.steps_offset, solver=s.solver, post_compress=s.post_compress)


def trainable_state(model: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: only the adapters under LoRA (the base is rebuilt), else everything."""
    if lora:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in model.state_dict().items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], lora: bool, source="checkpoint") -> None:
    """Load ``trainable_state`` output back; every expected key must be there with its shape and
    nothing else (CheckpointError naming ``source`` otherwise: the config's model changed)."""
    expected = trainable_state(model, lora)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f"{what} {items[:3]}{' ...' if len(items) > 3 else ''}" for what, items in
                 (("missing", missing), ("unexpected", extra), ("shape mismatch", shapes)) if items]
        raise CheckpointError(f"{source} does not fit the {'LoRA adapters of the ' if lora else ''}model built from "
                              f"the config (was model.* or lora.* changed?): {'; '.join(parts)}")
    model.load_state_dict(state, strict=not lora)


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
    if use_ema and "ema" not in ckpt:
        raise CheckpointError(f"--ema: checkpoint {Path(path)} has no EMA weights (its run had optim.ema_decay=0); "
                              "leave out --ema")
    model = build_policy(cfg, dev)
    load_model_state(model, ckpt["model"], cfg.lora.enabled, source=f"checkpoint {Path(path)}")
    if use_ema:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, t in ckpt["ema"].items():
                params[n].copy_(t.to(params[n].dtype))
    log.info("loaded policy from %s (step %s%s)", path, ckpt["state"].get("step"), ", EMA" if use_ema else "")
    model.eval()
    return model, cfg
