"""A prompt dataset read from a text file (one prompt per line), for models without a world.

Models outside the shapes world train on prompt lists users supply (the paper used HPS-v2
and VidProM prompts): ``data: {name: prompt_file, kwargs: {path: prompts.txt}}``. The last ``eval_fraction`` of the
lines (at least one) is the "heldout" split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, MissingFileError

__all__ = ["PromptFile", "TextPrompt"]


@dataclass(frozen=True)
class TextPrompt:
    text: str
    image: object = None


class PromptFile:
    def __init__(self, path: str, split: str = "train", task: str = "t2i", eval_fraction: float = 0.1):
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"prompt file {str(p)!r} does not exist (data.kwargs.path)")
        if task == "i2v":
            raise ConfigError("data.kwargs.task=i2v: prompt_file holds text only; image-to-video needs a dataset with first frames")
        if split not in ("train", "heldout"):
            raise ConfigError(f"data.train_split / data.eval_split must be 'train' or 'heldout' for prompt_file, got {split!r}")
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if len(lines) < 2:
            raise ConfigError(f"prompt file {p} (data.kwargs.path) needs at least 2 non-empty lines, has {len(lines)}")
        n_eval = max(1, int(len(lines) * eval_fraction))
        self.prompts = lines[-n_eval:] if split == "heldout" else lines[:-n_eval]

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[TextPrompt]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        return [TextPrompt(self.prompts[i]) for i in idx]

    def fixed(self, n: int) -> list[TextPrompt]:
        return [TextPrompt(self.prompts[i % len(self.prompts)]) for i in range(n)]
