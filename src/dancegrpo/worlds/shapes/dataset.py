"""Prompt datasets of the shapes world for GRPO rollouts, evaluation and pretraining.

Tasks: ``"t2i"`` (text to image: image scenes), ``"t2v"`` (text to video: scenes with a
motion) and ``"i2v"`` (image to video: the same scenes, each prompt given with the rendered
first frame of its scene).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar import SceneSpec, sample_specs, specs_of_split
from .renderer import first_frames, render_batch

TASKS = ("t2i", "t2v", "i2v")
# A fixed permutation for ``fixed``: evaluation sets interleave attributes instead of
# walking the grammar's nested order (which would give 20 red circles first).
_FIXED_SEED = 20250507


@dataclass
class PromptItem:
    """A prompt, and for image-to-video its first frame (3, H, W) in [0, 1] (else None)."""

    text: str
    image: torch.Tensor | None = None


class PromptDataset:
    """Prompts of one task and split, with rendered first frames and pretraining data.

    ``split``: ``"train"`` (default), ``"heldout"`` or None (every scene). ``size`` is the
    image side in pixels, ``frames`` the video length.
    """

    def __init__(self, task: str = "t2i", split: str | None = "train", size: int = 32, frames: int = 8):
        if task not in TASKS:
            raise ValueError(f"PromptDataset: task must be one of {TASKS}, got {task!r}")
        if split not in (None, "train", "heldout"):
            raise ValueError(f"PromptDataset: split must be None, 'train' or 'heldout', got {split!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 8:
            raise ValueError(f"PromptDataset: size must be an int >= 8, got {size!r}")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
            raise ValueError(f"PromptDataset: frames must be a positive int, got {frames!r}")
        self.task, self.split, self.size, self.frames = task, split, size, frames
        self.video = task != "t2i"
        self.specs: list[SceneSpec] = specs_of_split(split, self.video)

    def __len__(self) -> int:
        return len(self.specs)

    def _items(self, specs: list[SceneSpec], generator: torch.Generator | None) -> list[PromptItem]:
        if self.task != "i2v":
            return [PromptItem(s.prompt, None) for s in specs]
        images = first_frames(specs, self.size, generator=generator)
        return [PromptItem(s.prompt, img) for s, img in zip(specs, images, strict=True)]

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[PromptItem]:
        """``n`` prompts drawn uniformly with replacement; for i2v each comes with its scene's
        first frame, jittered from the same ``generator``."""
        specs = sample_specs(n, generator, video=self.video, split=self.split)
        return self._items(specs, generator)

    def fixed(self, n: int) -> list[PromptItem]:
        """A deterministic list of ``n`` prompts (the same on every call and machine) for
        evaluation and sample grids: distinct scenes in a fixed shuffled order (repeating
        only when ``n`` exceeds the split); i2v frames are rendered without jitter."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"PromptDataset.fixed: n must be a non-negative int, got {n!r}")
        order = torch.randperm(len(self.specs), generator=torch.Generator().manual_seed(_FIXED_SEED))
        idx = order.repeat(n // len(self.specs) + 1)[:n]
        return self._items([self.specs[i] for i in idx.tolist()], None)

    def training_batch(self, n: int, generator: torch.Generator | None = None):
        """Rendered data for pretraining: ``(pixels, prompts)`` for t2i / t2v and
        ``(pixels, prompts, first_frames)`` for i2v.

        pixels: (n, 3, size, size) images or (n, 3, frames, size, size) videos, float32 in
        [0, 1], jittered from ``generator``; first_frames: (n, 3, size, size), frame 0 of
        each video.
        """
        specs = sample_specs(n, generator, video=self.video, split=self.split)
        pixels = render_batch(specs, self.size, frames=self.frames, video=self.video, generator=generator)
        prompts = [s.prompt for s in specs]
        if self.task == "i2v":
            return pixels, prompts, pixels[:, :, 0].contiguous()
        return pixels, prompts
