"""A prompt dataset read from a file, for models without a world.

Models outside the shapes world train on prompt lists users supply (the paper used HPS-v2
and VidProM prompts): ``data: {name: prompt_file, kwargs: {path: prompts.txt}}``.

* ``.txt``: one prompt a line (text-to-image, text-to-video).
* ``.jsonl``: one JSON object a line, ``{"prompt": "...", "image": "frames/cat.png"}``; the
  image path is relative to the file. Image-to-video needs an image on every line; text tasks
  may omit it. Images are read when a prompt is drawn, as (3, H, W) float32 in [0, 1]. A batch
  stacks them, so they must share one size: give ``image_size: [H, W]`` (or one int) to resize
  them as they are read, else files of different sizes are an error here, not mid-run.

The last ``eval_fraction`` of the prompts (at least one) is the "heldout" split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, MissingFileError

__all__ = ["PromptFile", "TextPrompt"]

_KEY = "data.kwargs.path"


@dataclass(frozen=True)
class TextPrompt:
    text: str
    image: object = None


def _image_size(value) -> tuple[int, int] | None:
    if value is None:
        return None
    size = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ConfigError(f"data.kwargs.image_size must be a positive int or [height, width], got {value!r}")
    return int(size[0]), int(size[1])


def _read_jsonl(p: Path) -> list[tuple[str, Path | None]]:
    records = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{n}: invalid JSON ({exc.msg}); expected {{\"prompt\": ..., \"image\": ...}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ConfigError(f"{p}:{n}: expected an object with a non-empty string \"prompt\", got {line.strip()[:80]!r}")
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            raise ConfigError(f"{p}:{n}: \"image\" must be a path (relative to the file), got {image!r}")
        path = None
        if image is not None:
            path = (p.parent / image).resolve()
            if not path.is_file():
                raise MissingFileError(f"{p}:{n}: image {image!r} does not exist (looked for {path})")
        records.append((obj["prompt"].strip(), path))
    return records


class PromptFile:
    def __init__(self, path: str, split: str = "train", task: str = "t2i", eval_fraction: float = 0.1,
                 image_size=None):
        p = Path(path)
        if not p.is_file():
            raise MissingFileError(f"prompt file {str(p)!r} does not exist ({_KEY})")
        if split not in ("train", "heldout"):
            raise ConfigError(f"data.train_split / data.eval_split must be 'train' or 'heldout' for prompt_file, got {split!r}")
        self.image_size = _image_size(image_size)
        if p.suffix == ".jsonl":
            records = _read_jsonl(p)
        else:
            records = [(ln.strip(), None) for ln in p.read_text().splitlines() if ln.strip()]
        if task == "i2v":
            missing = [i for i, (_, im) in enumerate(records) if im is None]
            if p.suffix != ".jsonl" or missing:
                raise ConfigError(f"data.kwargs.task=i2v needs a first frame for every prompt: a .jsonl file with "
                                  f"{{\"prompt\": ..., \"image\": ...}} lines ({_KEY}={str(p)!r})")
        elif any(im is not None for _, im in records) and not all(im is not None for _, im in records):
            raise ConfigError(f"{p}: some prompts have an image and some do not; give every line one or none")
        if len(records) < 2:
            raise ConfigError(f"prompt file {p} ({_KEY}) needs at least 2 prompts, has {len(records)}")
        if self.image_size is None:
            self._check_one_size(p, records)
        n_eval = max(1, int(len(records) * eval_fraction))
        self.records = records[-n_eval:] if split == "heldout" else records[:-n_eval]
        self.prompts = [text for text, _ in self.records]

    @staticmethod
    def _check_one_size(p: Path, records) -> None:
        from PIL import Image

        sizes = {}
        for _, im in records:
            if im is not None:
                with Image.open(im) as f:  # reads the header only
                    sizes.setdefault(f.size, im)
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({path.name})" for (w, h), path in list(sizes.items())[:3])
            raise ConfigError(f"{p}: the images have different sizes ({shown}); a batch needs one size: set "
                              "data.kwargs.image_size=[H, W] to resize them as they are read")

    def _load(self, path: Path | None):
        if path is None:
            return None
        import numpy as np
        from PIL import Image

        with Image.open(path) as f:
            img = f.convert("RGB")
            if self.image_size is not None:
                img = img.resize((self.image_size[1], self.image_size[0]), Image.BICUBIC)
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def _item(self, i: int) -> TextPrompt:
        text, path = self.records[i]
        return TextPrompt(text, self._load(path))

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[TextPrompt]:
        idx = torch.randint(len(self.records), (n,), generator=generator).tolist()
        return [self._item(i) for i in idx]

    def fixed(self, n: int) -> list[TextPrompt]:
        return [self._item(i % len(self.records)) for i in range(n)]
