"""Model registry: name -> builder, held as lazy ``"module:attr"`` strings (like ops/dispatch.py).

Nothing is imported until a model is built, so ``import dancegrpo`` stays light and a world
that is not installed only fails when asked for. Paper models whose diffusers adapters are not
written yet are listed, so configs naming them load and validate, and building one says so.
"""

from __future__ import annotations

import difflib
import importlib

__all__ = ["LazyRegistry", "MODELS", "build_model", "model_names"]


class NotAvailableError(NotImplementedError):
    """A registered name whose implementation does not exist yet (it says what is missing)."""


class LazyRegistry:
    """name -> ``"module:attr"`` (imported on first use) or an "unavailable" reason."""

    def __init__(self, kind: str, entries: dict[str, str], unavailable: dict[str, str] | None = None):
        self.kind = kind
        self._entries = dict(entries)
        self._unavailable = dict(unavailable or {})

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries) + tuple(self._unavailable)

    def __contains__(self, name) -> bool:
        return name in self._entries or name in self._unavailable

    def register(self, name: str, target: str) -> None:
        """Add or replace an entry (``target`` is ``"module:attr"``)."""
        if not isinstance(target, str) or ":" not in target:
            raise ValueError(f"target must be a 'module:attr' string, got {target!r}")
        self._entries[name] = target
        self._unavailable.pop(name, None)

    def resolve(self, name: str):
        """The callable registered under ``name``."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        if name in self._unavailable:
            raise NotAvailableError(f"{self.kind} {name!r} is not available yet: {self._unavailable[name]}")
        if name not in self._entries:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}{hint}; known: {', '.join(self.names())}")
        module, attr = self._entries[name].split(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"{self.kind} {name!r} needs module {module!r}, which failed to import: {exc}") from exc
        return getattr(mod, attr)

    def build(self, name: str, **kwargs):
        return self.resolve(name)(**kwargs)


_DIFFUSERS = ("needs the diffusers adapter (dancegrpo.models.diffusers), which is not written yet; "
              "use model 'shapes' or 'toy', or register your own GenerativeModel")

MODELS = LazyRegistry(
    "model",
    {
        "toy": "dancegrpo.worlds.toy:build_toy_model",
        "shapes": "dancegrpo.worlds.shapes.policy:build_policy",
        "flux": "dancegrpo.models.diffusers.flux:build_flux",
        "sd3": "dancegrpo.models.diffusers.sd3:build_sd3",
        "sd": "dancegrpo.models.diffusers.sd:build_sd",
        "sd14": "dancegrpo.models.diffusers.sd:build_sd",  # the paper's name for it
    },
    unavailable={
        "hunyuanvideo": f"HunyuanVideo {_DIFFUSERS}",
        "skyreels_i2v": f"SkyReels I2V {_DIFFUSERS}",
        "wan_i2v": f"Wan 2.1 I2V {_DIFFUSERS}",
    },
)


def build_model(name: str, **kwargs):
    """Build the GenerativeModel registered as ``name`` with the builder's keyword arguments."""
    return MODELS.build(name, **kwargs)


def model_names() -> tuple[str, ...]:
    return MODELS.names()
