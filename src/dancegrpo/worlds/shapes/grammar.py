"""The shapes world's prompt grammar: vocabularies, scene specs, prompts and the train/held-out split.

A prompt names one object and its scene, e.g.::

    a small red circle on the left, white background
    a large blue triangle at the top, black background, moving down

Every prompt parses back to exactly the :class:`SceneSpec` that wrote it. For video, the
position is where the object *starts* (the first frame, which image-to-video is given); a
motion that would carry the object out of the frame from its start is not part of the world
(``compatible`` says which), so every scene the grammar names can be rendered cleanly.

The split is a stable hash (SHA-256, not Python's salted ``hash``) of the attribute
combination, so "held-out" prompts are attribute combinations a base model never saw in
training, the same on every machine and every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache

import torch

# Well separated in RGB (closest pair, orange/yellow, is 0.37 apart) and far from every
# background (>= 0.4), so the nearest named colour of a sample is unambiguous.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.15),
    "cyan": (0.00, 0.80, 0.85),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.60, 0.15, 0.80),
}

# Told apart at 32x32 by fill ratio of the bounding box, vertical asymmetry and the
# normalised polar moment (see rewards/detector). Every shape fits a [-r, r]^2 box.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

# Half-extent of the object as a fraction of the image side (before jitter). 0.12 -> an
# 8 px wide object at 32x32; 0.20 -> 13 px.
SIZES: dict[str, float] = {"small": 0.12, "large": 0.20}

# Centre of the object (x, y) as fractions of the image side, y down (image convention),
# with the phrase that names it.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
}
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}

MOTIONS: tuple[str, ...] = (
    "moving left", "moving right", "moving up", "moving down", "bouncing", "growing", "shrinking",
)

# Motions that would leave the frame from a start position (travel is 0.25 of the frame,
# a bounce rises 0.15 above its start): such scenes are not in the world.
_EXCLUDED: dict[str, frozenset[str]] = {
    "moving left": frozenset({"left"}),
    "moving right": frozenset({"right"}),
    "moving up": frozenset({"top"}),
    "moving down": frozenset({"bottom"}),
    "bouncing": frozenset({"top"}),
}


def compatible(position: str, motion: str | None) -> bool:
    """Whether an object starting at ``position`` can make ``motion`` without leaving the frame."""
    return motion is None or position not in _EXCLUDED.get(motion, frozenset())


def _check_word(kind: str, value, allowed) -> None:
    if not isinstance(value, str):
        raise TypeError(f"SceneSpec.{kind} must be a str, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"SceneSpec.{kind}: unknown {kind} {value!r}; expected one of {sorted(allowed)}")


@dataclass(frozen=True)
class SceneSpec:
    """One scene of the world: an object of a colour, shape and size at a position on a
    background, optionally moving (video). All fields are vocabulary words."""

    color: str
    shape: str
    size: str
    position: str
    background: str
    motion: str | None = None

    def __post_init__(self):
        _check_word("color", self.color, COLORS)
        _check_word("shape", self.shape, SHAPES)
        _check_word("size", self.size, SIZES)
        _check_word("position", self.position, POSITIONS)
        _check_word("background", self.background, BACKGROUNDS)
        if self.motion is not None:
            _check_word("motion", self.motion, MOTIONS)
            if not compatible(self.position, self.motion):
                raise ValueError(
                    f"SceneSpec.motion: {self.motion!r} from position {self.position!r} would leave "
                    f"the frame; positions allowed with it: "
                    f"{sorted(set(POSITIONS) - _EXCLUDED[self.motion])}")

    @property
    def video(self) -> bool:
        return self.motion is not None

    @property
    def prompt(self) -> str:
        """The prompt text, e.g. "a small red circle on the left, white background"."""
        text = (f"a {self.size} {self.color} {self.shape} {POSITION_PHRASES[self.position]}, "
                f"{self.background} background")
        if self.motion is not None:
            text += f", {self.motion}"
        return text

    def key(self) -> str:
        """The attribute combination as a stable string (what the split hashes)."""
        parts = [self.color, self.shape, self.size, self.position, self.background]
        if self.motion is not None:
            parts.append(self.motion)
        return "|".join(parts)


_PHRASE_TO_POSITION = {phrase: pos for pos, phrase in POSITION_PHRASES.items()}


def _unknown(kind: str, word: str, allowed, text: str) -> ValueError:
    return ValueError(f"parse_prompt: unknown {kind} {word!r} in {text!r}; expected one of {sorted(allowed)}")


def parse_prompt(text: str) -> SceneSpec:
    """The :class:`SceneSpec` a prompt describes (the exact inverse of ``SceneSpec.prompt``).

    Case and runs of whitespace are forgiven; any word outside the grammar raises a
    ``ValueError`` naming it.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_prompt: text must be a str, got {type(text).__name__}")
    clauses = [" ".join(c.lower().split()) for c in text.split(",")]
    if len(clauses) not in (2, 3):
        raise ValueError(
            f"parse_prompt: expected 'a <size> <color> <shape> <position>, <background> background"
            f"[, <motion>]', got {text!r}")
    words = clauses[0].split()
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"parse_prompt: expected 'a <size> <color> <shape> <position>' first, got {clauses[0]!r}")
    size, color, shape = words[1], words[2], words[3]
    if size not in SIZES:
        raise _unknown("size", size, SIZES, text)
    if color not in COLORS:
        raise _unknown("color", color, COLORS, text)
    if shape not in SHAPES:
        raise _unknown("shape", shape, SHAPES, text)
    phrase = " ".join(words[4:])
    if phrase not in _PHRASE_TO_POSITION:
        raise _unknown("position phrase", phrase, _PHRASE_TO_POSITION, text)
    bg_words = clauses[1].split()
    if len(bg_words) != 2 or bg_words[1] != "background":
        raise ValueError(f"parse_prompt: expected '<background> background', got {clauses[1]!r} in {text!r}")
    if bg_words[0] not in BACKGROUNDS:
        raise _unknown("background", bg_words[0], BACKGROUNDS, text)
    motion = None
    if len(clauses) == 3:
        motion = clauses[2]
        if motion not in MOTIONS:
            raise _unknown("motion", motion, MOTIONS, text)
    return SceneSpec(color, shape, size, _PHRASE_TO_POSITION[phrase], bg_words[0], motion)


@cache
def _all_specs(video: bool) -> tuple[SceneSpec, ...]:
    motions = MOTIONS if video else (None,)
    return tuple(
        SceneSpec(c, s, z, p, b, m)
        for c in COLORS for s in SHAPES for z in SIZES for p in POSITIONS for b in BACKGROUNDS
        for m in motions if compatible(p, m))


def all_specs(video: bool = False) -> list[SceneSpec]:
    """Every scene of the world in a fixed order: 1050 image scenes, 6300 video scenes."""
    return list(_all_specs(bool(video)))


def split_of(spec: SceneSpec) -> str:
    """``"train"`` or ``"heldout"``: about 80/20, by a stable hash of the attribute combination."""
    if not isinstance(spec, SceneSpec):
        raise TypeError(f"split_of: spec must be a SceneSpec, got {type(spec).__name__}")
    digest = hashlib.sha256(spec.key().encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 100 < 20 else "train"


@cache
def _split_specs(video: bool, split: str | None) -> tuple[SceneSpec, ...]:
    specs = _all_specs(video)
    return specs if split is None else tuple(s for s in specs if split_of(s) == split)


def specs_of_split(split: str | None, video: bool = False) -> list[SceneSpec]:
    """``all_specs(video)`` restricted to ``split`` (None keeps all), in the same order."""
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    return list(_split_specs(bool(video), split))


def sample_specs(n: int, generator: torch.Generator | None = None, *, video: bool = False,
                 split: str | None = None) -> list[SceneSpec]:
    """``n`` scenes drawn uniformly (with replacement) from the split, reproducibly from ``generator``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"sample_specs: n must be a non-negative int, got {n!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample_specs: generator must be a torch.Generator or None, got {type(generator).__name__}")
    pool = specs_of_split(split, video)
    idx = torch.randint(len(pool), (n,), generator=generator)
    return [pool[i] for i in idx.tolist()]
