"""A tiny world for fast tests and a first run: colour prompts, a small velocity MLP, a colour reward.

* Prompts are colour names ("red", "cyan", ...). For ``task="i2v"`` each prompt also carries a
  first-frame image (a noisy tile of a colour), fed to the model as conditioning.
* ``ToyModel`` is a rectified-flow GenerativeModel on (3, S, S) latents, S = 2 by default (or
  (3, T, S, S) for video): an MLP over the flattened latent, a prompt embedding and sin/cos timestep features.
  Latents live in [-1, 1] data space; ``decode`` maps them to pixels in [0, 1].
* ``ToyColourReward`` scores how close a sample's mean colour is to its prompt's colour:
  ``1 - ||mean_rgb - target|| / sqrt(3)`` in [0, 1]; ``correct`` says whether it is within 0.25.

A random-init ToyModel produces greyish noise (reward ~0.5); a few seconds of GRPO on CPU
push the mean colour towards the prompt, which is what the trainer tests check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["COLOURS", "ToyPrompt", "ToyPromptDataset", "ToyModel", "ToyColourReward", "build_toy_model"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
_NAMES = tuple(COLOURS)
_TASKS = ("t2i", "t2v", "i2v")


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt: its text and, for image-to-video, a first frame (3, H, W) in [0, 1]."""

    text: str
    image: torch.Tensor | None = None


def _colour(text: str) -> tuple[float, float, float]:
    if text not in COLOURS:
        raise ValueError(f"toy prompt must be one of {_NAMES}, got {text!r}")
    return COLOURS[text]


class ToyPromptDataset:
    """Colour prompts. ``split`` "train" and "heldout" hold the same colours (it is a toy);
    ``fixed(n)`` cycles through them in order, ``sample(n, generator)`` draws with replacement."""

    def __init__(self, task: str = "t2i", split: str = "train", size: int = 2):
        if task not in _TASKS:
            raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.task, self.split, self.size = task, split, int(size)
        self.prompts = list(_NAMES)

    def __len__(self) -> int:
        return len(self.prompts)

    def _item(self, index: int, generator: torch.Generator | None) -> ToyPrompt:
        text = self.prompts[index]
        image = None
        if self.task == "i2v":
            base = torch.tensor(_colour(text)).view(3, 1, 1).expand(3, self.size, self.size)
            jitter = 0.1 * torch.randn(3, self.size, self.size, generator=generator)
            image = (base + jitter).clamp(0, 1)
        return ToyPrompt(text, image)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[ToyPrompt]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        return [self._item(i, generator) for i in idx]

    def fixed(self, n: int) -> list[ToyPrompt]:
        g = torch.Generator().manual_seed(1000)  # fixed prompts are the same in every call
        return [self._item(i % len(self.prompts), g) for i in range(n)]


class ToyModel(nn.Module):
    """Velocity MLP conditioned on a prompt embedding (and a first-frame colour for i2v).

    Latent shape (3, size, size), or (3, frames, size, size) when ``frames > 0``.
    """

    prediction = "velocity"

    def __init__(self, size: int = 2, frames: int = 0, hidden: int = 64, embed: int = 16,
                 image_conditioning: bool = False):
        super().__init__()
        self.size, self.frames = int(size), int(frames)
        self._shape = (3, self.frames, self.size, self.size) if self.frames else (3, self.size, self.size)
        dim = math.prod(self._shape)
        self.embed = nn.Embedding(len(_NAMES), embed)
        self.image_proj = nn.Linear(3, embed) if image_conditioning else None
        self.net = nn.Sequential(nn.Linear(dim + embed + 2, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def latent_shape(self) -> tuple[int, ...]:
        return self._shape

    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> dict:
        device = self.embed.weight.device
        idx = torch.tensor([_NAMES.index(p) if p in COLOURS else -1 for p in prompts], dtype=torch.long)
        if bool((idx < 0).any()):
            bad = [p for p in prompts if p not in COLOURS]
            raise ValueError(f"toy prompts must be one of {_NAMES}, got {bad[:3]}")
        cond = {"prompt": idx.to(device)}
        if self.image_proj is not None:
            if images is None:
                raise ValueError("this ToyModel is image-conditioned (i2v): encode_prompts needs images (B, 3, H, W)")
            cond["image"] = images.to(device=device, dtype=torch.float32).flatten(2).mean(2)  # (B, 3) mean colour
        return cond

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        b = latents.shape[0]
        t = (timesteps.to(latents.device, torch.float32) / 1000.0).expand(b)[:, None]
        h = self.embed(cond["prompt"])
        if self.image_proj is not None:
            h = h + self.image_proj(cond["image"])
        feats = torch.cat([latents.flatten(1).to(h.dtype), h, torch.sin(t * math.pi / 2).to(h.dtype),
                           torch.cos(t * math.pi / 2).to(h.dtype)], 1)
        return self.net(feats).view_as(latents).to(latents.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float().clamp(-1, 1) + 1) / 2)


def build_toy_model(task: str = "t2i", seed: int = 0, size: int = 2, frames: int | None = None,
                    hidden: int = 64, pretrained=False) -> ToyModel:
    """The registry's "toy" model, initialised deterministically from ``seed``.

    ``pretrained`` is accepted for interface parity with other worlds; a path loads a
    safetensors state dict.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    if frames is None:
        frames = 0 if task == "t2i" else 4
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ToyModel(size=size, frames=frames, hidden=hidden, image_conditioning=task == "i2v")
    finally:
        torch.random.set_rng_state(state)  # building a model must not move the caller's RNG
    if isinstance(pretrained, str):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(pretrained))
    return model


class ToyColourReward:
    """``1 - ||mean_rgb(sample) - colour(prompt)|| / sqrt(3)``: (B,) float32 in [0, 1].

    samples: (B, 3, H, W) or (B, 3, T, H, W) in [0, 1]; prompts: B colour names.
    """

    name = "toy_colour"

    def __init__(self, threshold: float = 0.25):
        self.threshold = float(threshold)

    def _distance(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if samples.dim() not in (4, 5) or samples.shape[1] != 3:
            raise ValueError(f"samples must be (B, 3, H, W) or (B, 3, T, H, W), got {tuple(samples.shape)}")
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {samples.shape[0]} samples")
        target = torch.tensor([_colour(p) for p in prompts], dtype=torch.float32, device=samples.device)
        mean = samples.float().flatten(2).mean(2)
        return (mean - target).norm(dim=1)

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (1 - self._distance(samples, prompts) / math.sqrt(3)).float()

    def correct(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._distance(samples, prompts) < self.threshold
