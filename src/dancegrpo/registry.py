"""Registries of models, rewards and prompt datasets: name -> ``"module:attr"``, imported on use.

Nothing is imported until an entry is built, so ``import dancegrpo`` stays light and a world
that is not installed only fails when asked for. Configs name their pieces by these names;
``register`` adds your own (or pass the object to ``Trainer`` directly).

* ``MODELS``: builders of a :class:`~dancegrpo.models.interface.GenerativeModel`.
* ``REWARDS``: reward classes; a reward is a callable ``reward(samples, prompts) -> (B,)
  float32`` with a ``name``, samples (B, 3, H, W) or (B, 3, T, H, W) in [0, 1]. It may offer
  ``correct(samples, prompts) -> (B,) bool`` (then evaluation reports ``correct_rate``).
* ``DATASETS``: prompt datasets ``Dataset(task=..., split=..., **kwargs)`` with
  ``sample(n, generator)`` and ``fixed(n)`` returning items with ``.text`` and ``.image``
  (None, or (3, H, W) in [0, 1]).
"""

from __future__ import annotations

import difflib
import importlib

from .errors import ConfigError

__all__ = ["LazyRegistry", "UnknownNameError", "MODELS", "REWARDS", "DATASETS", "build_model", "build_reward", "build_dataset"]


class UnknownNameError(ConfigError):
    """A name that is not registered (a user error: the message lists the known names)."""


class LazyRegistry:
    """name -> ``"module:attr"``, the module imported on first use."""

    def __init__(self, kind: str, entries: dict[str, str]):
        self.kind = kind
        self._entries: dict[str, str] = {}
        for name, target in entries.items():
            self.register(name, target)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def register(self, name: str, target: str) -> None:
        """Add or replace an entry (``target`` is ``"module:attr"``)."""
        if not isinstance(target, str) or target.count(":") != 1:
            raise ValueError(f"target must be a 'module:attr' string, got {target!r}")
        self._entries[name] = target

    def resolve(self, name: str):
        """The callable registered under ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")
        module, attr = self._entries[name].split(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"{self.kind} {name!r} needs module {module!r}, which failed to import: {exc}") from exc
        return getattr(mod, attr)

    def build(self, name: str, **kwargs):
        return self.resolve(name)(**kwargs)


_SHAPES_REWARDS = "dancegrpo.worlds.shapes.rewards"

MODELS = LazyRegistry("model", {
    "toy": "dancegrpo.worlds.toy:build_toy_model",
    "shapes": "dancegrpo.worlds.shapes.policy:build_policy",
    "flux": "dancegrpo.models.diffusers.flux:build_flux",
    "sd3": "dancegrpo.models.diffusers.sd3:build_sd3",
    "sd": "dancegrpo.models.diffusers.sd:build_sd",
    "qwen_image": "dancegrpo.models.diffusers.qwen_image:build_qwen_image",
    "wan": "dancegrpo.models.diffusers.wan:build_wan",
    "wan_i2v": "dancegrpo.models.diffusers.wan:build_wan_i2v",
    "hunyuanvideo": "dancegrpo.models.diffusers.hunyuan_video:build_hunyuanvideo",
    "skyreels_i2v": "dancegrpo.models.diffusers.hunyuan_video:build_skyreels_i2v",
})

REWARDS = LazyRegistry("reward", {
    "toy": "dancegrpo.worlds.toy:ToyColourReward",
    "shapes_alignment": f"{_SHAPES_REWARDS}:AlignmentReward",
    "shapes_binary": f"{_SHAPES_REWARDS}:BinaryReward",
    "shapes_aesthetic": f"{_SHAPES_REWARDS}:AestheticReward",
    "shapes_motion": f"{_SHAPES_REWARDS}:MotionReward",
    "jpeg_compressibility": f"{_SHAPES_REWARDS}:JpegCompressibilityReward",
    "clip_score": "dancegrpo.rewards.clip:ClipScore",
    "pickscore": "dancegrpo.rewards.clip:PickScore",
    "aesthetic": "dancegrpo.rewards.aesthetic:AestheticReward",
    "hps_v2": "dancegrpo.rewards.hps:HPSv2Reward",
    "binary": "dancegrpo.rewards.binary:BinaryReward",
    "remote": "dancegrpo.rewards.remote:RemoteReward",
    "vlm_judge": "dancegrpo.rewards.vlm_judge:VLMJudgeReward",
    "image_reward": "dancegrpo.rewards.image_reward:ImageReward",
    "videoalign": "dancegrpo.rewards.videoalign:VideoAlignReward",
})

DATASETS = LazyRegistry("prompt dataset", {
    "toy": "dancegrpo.worlds.toy:ToyPromptDataset",
    "shapes": "dancegrpo.worlds.shapes.dataset:PromptDataset",
    "prompt_file": "dancegrpo.trainer.prompts:PromptFile",
})


def build_model(name: str, **kwargs):
    """The GenerativeModel registered as ``name``, built with the builder's keyword arguments."""
    return MODELS.build(name, **kwargs)


def build_reward(name: str, **kwargs):
    """The reward registered as ``name``, constructed with ``kwargs``."""
    return REWARDS.build(name, **kwargs)


def build_dataset(name: str, **kwargs):
    """The prompt dataset registered as ``name``, constructed with ``kwargs`` (task, split...)."""
    return DATASETS.build(name, **kwargs)
