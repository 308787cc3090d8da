"""Configuration of the video DiT, its presets and its JSON form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .attention import BACKEND_NAMES

CHECKPOINTING_MODES = ("none", "full", "selective")
MODULATION_MODES = ("block", "shared")

# Sizes from CPU tests to GPU benchmarks. "wan-1.3b" matches Wan2.1-T2V-1.3B's widths (1536
# hidden, 30 blocks, 12 heads, FFN 8960, umT5 text 4096, 16 VAE channels, patch 1x2x2) and, like
# Wan, shares one adaLN projection across blocks (see layers.Modulation): about 1.4B parameters.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0),
    "small": dict(hidden_size=192, depth=6, num_heads=6, mlp_ratio=4.0),
    "base": dict(hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "wan-1.3b": dict(in_channels=16, patch_size=(1, 2, 2), hidden_size=1536, depth=30, num_heads=12,
                     mlp_ratio=8960 / 1536, text_dim=4096, modulation="shared"),
}


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DiTConfig.{name} must be a positive int, got {value!r}")


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"DiTConfig.{name} must be one of {list(allowed)}, got {value!r}")


@dataclass
class DiTConfig:
    """Hyper-parameters of ``VideoDiT``.

    patch_size is (t, h, w); an image is a one-frame video and needs t == 1. joint_attention
    False gives self-attention + cross-attention to text, True MM-DiT joint attention.
    image_condition adds the first frame (broadcast over time) and a first-frame flag as input
    channels. absolute_pos adds a fixed sinusoidal embedding of each token's absolute place
    (RoPE alone is relative; small models learn "at the top" much faster with it).
    frame_embedding > 0 adds a learned embedding per temporal token index, for up to that
    many latent frames (zero at init; the shapes world's video models start from an image
    model with it set to cancel the change of absolute_pos's time coordinate). checkpointing: "none", "full" (every block) or "selective" (every
    ``checkpoint_every``-th block). modulation: "block" (a per-block adaLN projection, DiT) or
    "shared" (one projection plus per-block offsets, PixArt-alpha / Wan).
    """

    in_channels: int = 3
    out_channels: int | None = None
    patch_size: tuple[int, int, int] = (1, 4, 4)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    joint_attention: bool = False
    image_condition: bool = False
    qk_norm: bool = True
    rope_theta: float = 10000.0
    attention_backend: str = "auto"
    checkpointing: str = "none"
    checkpoint_every: int = 2
    modulation: str = "block"
    freq_dim: int = 256
    absolute_pos: bool = False
    frame_embedding: int = 0

    def __post_init__(self):
        for name in ("in_channels", "hidden_size", "depth", "num_heads", "text_dim", "checkpoint_every", "freq_dim"):
            _positive_int(name, getattr(self, name))
        if self.out_channels is not None:
            _positive_int("out_channels", self.out_channels)
        if isinstance(self.frame_embedding, bool) or not isinstance(self.frame_embedding, int) or self.frame_embedding < 0:
            raise ValueError(f"DiTConfig.frame_embedding must be an int >= 0, got {self.frame_embedding!r}")
        ps = self.patch_size
        if not isinstance(ps, (tuple, list)) or len(ps) != 3:
            raise ValueError(f"DiTConfig.patch_size must be a (t, h, w) tuple of 3 ints, got {ps!r}")
        for p in ps:
            _positive_int("patch_size", p)
        self.patch_size = tuple(ps)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        hd = self.head_dim
        if hd % 2 or hd < 6:
            raise ValueError(f"DiTConfig: head dim hidden_size / num_heads = {hd} must be even and >= 6 "
                             "(3-D RoPE splits it over t, h, w)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"DiTConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim must be even, got {self.freq_dim}")
        _choice("attention_backend", self.attention_backend, BACKEND_NAMES)
        _choice("checkpointing", self.checkpointing, CHECKPOINTING_MODES)
        _choice("modulation", self.modulation, MODULATION_MODES)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def input_channels(self) -> int:
        """Channels entering the patch embedding: the latent, plus the broadcast first frame and
        its flag with image_condition."""
        return 2 * self.in_channels + 1 if self.image_condition else self.in_channels

    @classmethod
    def preset(cls, name: str, **overrides) -> DiTConfig:
        """A named size ("tiny", "small", "base", "wan-1.3b") with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"DiTConfig.preset: name must be one of {list(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a file from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DiTConfig.from_dict: unknown keys {unknown}")
        return cls(**d)
