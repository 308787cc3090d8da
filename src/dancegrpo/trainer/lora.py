"""LoRA through ``peft`` (optional dependency), and the reference policy for the KL term.

``peft.inject_adapter_in_model`` adds adapters in place, so the model keeps its
GenerativeModel methods; only adapter weights train. The KL reference is then the same model
with its adapters disabled (no second copy in memory); without LoRA it is a frozen copy of
the base model.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import ConfigError, MissingDependencyError

__all__ = ["apply_lora", "require_peft", "adapters_disabled", "reference_predictor"]


def require_peft():
    try:
        import peft
    except ImportError as exc:
        raise MissingDependencyError("lora.enabled=true needs the optional dependency peft: `pip install peft` "
                          "(or `pip install dancegrpo[lora]`), or set lora.enabled=false for a full fine-tune") from exc
    return peft


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place. Empty target_modules: the model's own
    ``lora_target_modules`` when it has them (diffusers adapters), else every nn.Linear.

    Afterwards only the adapter parameters have ``requires_grad``.
    """
    peft = require_peft()
    if not isinstance(model, nn.Module):
        raise TypeError(f"LoRA needs the model to be a torch.nn.Module, got {type(model).__name__}")
    targets = list(target_modules) or list(getattr(model, "lora_target_modules", ())) or sorted(
        {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    if not targets:
        raise ConfigError("lora.enabled=true: the model has no nn.Linear layer to adapt; set lora.target_modules")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not any(n == t or n.endswith(f".{t}") for t in targets for n, _ in model.named_modules()):
        raise ConfigError(f"lora.target_modules {targets} matched no layer of the model; its linear layers "
                          f"include {linear[:4]}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    model = peft.inject_adapter_in_model(config, model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"lora.target_modules {targets} matched no layer of the model")
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: every peft adapter layer of ``model`` switched off for the block."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def reference_predictor(model, lora: bool):
    """A function ``(x, t, cond) -> v_ref`` of the frozen reference policy (no grad)."""
    if lora:
        def predict(x, t, cond):
            with torch.no_grad(), adapters_disabled(model):
                return model.predict(x, t, cond)
        return predict
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)

    def predict_frozen(x, t, cond):
        ref.train(model.training)  # same module mode as the policy's forward it is compared with
        with torch.no_grad():
            return ref.predict(x, t, cond)
    predict_frozen.module = ref
    return predict_frozen
