"""Weight-free rewards of the shapes world, mirroring the kinds of rewards the papers use.

Each reward is a callable ``reward(samples, prompts) -> (B,) float32`` with a ``name`` and a
documented ``range``. ``samples`` are images (B, 3, H, W) or videos (B, 3, T, H, W) with
pixels in [0, 1] (values outside are clamped, non-finite ones replaced: a reward is never
NaN); ``prompts`` are B prompts of the grammar. Videos are scored frame by frame and
averaged over frames, except where a reward says otherwise. The result is on the samples'
device.

* :class:`AlignmentReward` - text-image alignment (does the sample show the colour and
  shape asked for), graded so GRPO gets signal from near misses; ``correct`` is the
  headline "% correct" metric.
* :class:`BinaryReward` - thresholded alignment (0 or 1).
* :class:`AestheticReward` - an "aesthetic" proxy: contrast, edge sharpness, clean background.
* :class:`MotionReward` - video motion quality: the tracked object follows the asked motion,
  smoothly.
* :class:`JpegCompressibilityReward` - DDPO's compressibility: minus the JPEG size in kB.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache

import torch

from .detector import (
    COLOR_TABLE,
    Detection,
    classify,
    detect,
    detect_batch,
    measure,
    shape_distances,
)
from .grammar import COLORS, MOTIONS, POSITIONS, SHAPES, SIZES, SceneSpec, parse_prompt
from .renderer import motion_offsets

__all__ = [
    "Detection", "detect", "detect_batch", "AlignmentReward", "BinaryReward", "AestheticReward",
    "MotionReward", "JpegCompressibilityReward",
]

_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_SIZE_INDEX = {s: i for i, s in enumerate(SIZES)}
_POSITION_INDEX = {p: i for i, p in enumerate(POSITIONS)}
ATTRIBUTES = ("color", "shape", "size", "position")


@lru_cache(maxsize=8192)
def _parse(prompt: str) -> SceneSpec:
    return parse_prompt(prompt)


def _frames(samples, prompts, fn: str, *, parse: bool = True) -> tuple[torch.Tensor, list[SceneSpec] | None, int]:
    """Validate; return frames (B*T, 3, H, W) on the CPU, the parsed specs (None when
    ``parse`` is False, where prompts may also be None) and T (1 for images)."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{fn}: samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.dim() not in (4, 5) or samples.shape[1] != 3:
        raise ValueError(f"{fn}: samples must be (B, 3, H, W) or (B, 3, T, H, W), got {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"{fn}: samples is an empty batch")
    specs = None
    if parse or prompts is not None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"{fn}: prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"{fn}: prompts has {len(prompts)} entries but samples has batch {samples.shape[0]}")
        if parse:
            specs = [_parse(p) for p in prompts]
    x = samples.detach().to("cpu", torch.float32)
    if x.dim() == 4:
        return x, specs, 1
    b, _, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, 3, h, w), specs, t


class _Reward:
    name = "reward"
    range = (0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, range={self.range})"


class AlignmentReward(_Reward):
    """Text-image alignment in [0, 1]: the mean over ``attributes`` of a soft match score,
    averaged over frames for a video; 0 where the detector finds no object.

    * colour: ``exp(-d^2 / (2 color_sigma^2))`` with d the RGB distance between the object's
      colour and the asked one (1 at the right colour; about 0.05 at the nearest other one).
    * shape: ``exp(-d^2 / 2)`` with d the detector's scaled feature distance to the asked
      shape's prototype (clean renders of the right shape: 0.7 to 1; other shapes: < 0.1).
    * size (optional): ``exp(-(log(half_extent / asked) / 0.2)^2 / 2)``.
    * position (optional): ``exp(-d^2 / (2 * 0.06^2))``, d the distance of the object's
      box centre from the asked position (fractions of the side). For a video the size and
      position are judged on the first frame (the prompt's position is where it starts).

    ``correct(samples, prompts)`` (B,) bool: every asked attribute classified right (nearest
    name), in at least half of a video's frames (size and position on the first frame).
    """

    name = "alignment"

    def __init__(self, attributes: Sequence[str] = ("color", "shape"), *, color_sigma: float = 0.15):
        attributes = tuple(attributes)
        bad = [a for a in attributes if a not in ATTRIBUTES]
        if not attributes or bad:
            raise ValueError(f"AlignmentReward: attributes must be a non-empty subset of {ATTRIBUTES}, got {attributes}")
        if not color_sigma > 0:
            raise ValueError(f"AlignmentReward: color_sigma must be > 0, got {color_sigma}")
        self.attributes = attributes
        self.color_sigma = float(color_sigma)

    def scores(self, samples: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-attribute soft scores (B,) float32 in [0, 1] (CPU), averaged over frames."""
        x, specs, t = _frames(samples, prompts, f"{type(self).__name__}.scores")
        m = measure(x)
        return self._scores(m, specs, t)

    def _scores(self, m, specs, t) -> dict[str, torch.Tensor]:
        b = len(specs)
        found = m["found"].float().reshape(b, t)
        out = {}
        for attr in self.attributes:
            if attr == "color":
                want = torch.tensor([_COLOR_INDEX[s.color] for s in specs]).repeat_interleave(t)
                d = (m["rgb"] - COLOR_TABLE[want]).norm(dim=1)
                s = torch.exp(-d.pow(2) / (2 * self.color_sigma ** 2))
            elif attr == "shape":
                want = torch.tensor([_SHAPE_INDEX[s.shape] for s in specs]).repeat_interleave(t)
                d = shape_distances(m).gather(1, want[:, None])[:, 0]
                s = torch.exp(-0.5 * d.pow(2))
            elif attr == "size":
                want = torch.tensor([SIZES[s.size] for s in specs]).repeat_interleave(t)
                half = (m["width"] * m["height"]).sqrt() / 2
                s = torch.exp(-0.5 * (torch.log(half.clamp(min=1e-4) / want) / 0.2).pow(2))
            else:
                want = torch.tensor([POSITIONS[s.position] for s in specs]).repeat_interleave(t, dim=0)
                d = (torch.stack([m["bx"], m["by"]], 1) - want).norm(dim=1)
                s = torch.exp(-d.pow(2) / (2 * 0.06 ** 2))
            s = s.reshape(b, t) * found
            # Size and position name the start of a video: judge its first frame.
            out[attr] = (s[:, 0] if attr in ("size", "position") else s.mean(1)).float()
        return out

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        s = self.scores(samples, prompts)
        total = torch.stack([s[a] for a in self.attributes]).mean(0)
        return torch.nan_to_num(total, nan=0.0).to(samples.device)

    def correct(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) bool: all asked attributes right (see the class docstring)."""
        x, specs, t = _frames(samples, prompts, f"{type(self).__name__}.correct")
        b = len(specs)
        m = measure(x)
        c = classify(m)
        found = m["found"].reshape(b, t)
        ok = torch.ones(b, dtype=torch.bool)
        for attr in self.attributes:
            index = {"color": _COLOR_INDEX, "shape": _SHAPE_INDEX, "size": _SIZE_INDEX, "position": _POSITION_INDEX}[attr]
            want = torch.tensor([index[getattr(s, attr)] for s in specs])
            hit = (c[attr].reshape(b, t) == want[:, None]) & found
            ok &= hit[:, 0] if attr in ("size", "position") else hit.float().mean(1) >= 0.5
        return ok.to(samples.device)


class BinaryReward(_Reward):
    """1.0 where the alignment reward reaches ``threshold``, else 0.0. Range {0, 1}.

    The default 0.65 sits between a render with one attribute wrong (alignment <= 0.53) and
    the worst clean render with both right (about 0.58 for a tiny triangle; 99.9% of clean
    32x32 renders pass).
    """

    name = "binary"

    def __init__(self, threshold: float = 0.65, attributes: Sequence[str] = ("color", "shape"), **kwargs):
        if not 0 < threshold <= 1:
            raise ValueError(f"BinaryReward: threshold must be in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.alignment = AlignmentReward(attributes, **kwargs)

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return (self.alignment(samples, prompts) >= self.threshold).float()


def _aesthetic_parts(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-frame contrast, sharpness and clean-background scores in [0, 1] (see AestheticReward)."""
    a = m["alpha"]
    g = torch.cat([(a[:, :, 1:] - a[:, :, :-1]).abs().flatten(1), (a[:, 1:, :] - a[:, :-1, :]).abs().flatten(1)], 1)
    # Gradient-weighted mean |gradient|: the typical slope across the object's edges, which
    # does not depend on how long the edges are.
    slope = g.pow(2).sum(1) / g.sum(1).clamp(min=1e-6)
    found = m["found"].float()
    return {
        "contrast": (1 - torch.exp(-m["contrast"] / 0.3)) * found,
        "sharpness": slope.clamp(0, 1) * found,
        "clean": torch.exp(-m["background_std"] / 0.04),
    }


class AestheticReward(_Reward):
    """An "aesthetic" proxy in [0, 1]: the geometric mean of three scores per frame
    (averaged over frames), so a frame must do well on all three:

    * contrast: ``1 - exp(-c / 0.3)``, c the RGB distance between object and background;
    * sharpness: the gradient-weighted mean slope of the object's coverage across its edges,
      clamped to [0, 1] (an anti-aliased edge rises over about one pixel: about 0.6 to 1; a
      blurred edge is flatter);
    * clean background: ``exp(-s / 0.04)``, s the std of the pixels away from the object.

    A blank frame (no object) scores 0. ``prompts`` is accepted for the common signature
    (it may be None) and not used.
    """

    name = "aesthetic"

    def components(self, samples: torch.Tensor, prompts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The three scores (B,) float32 (CPU), averaged over frames."""
        x, _, t = _frames(samples, prompts, f"{type(self).__name__}.components", parse=False)
        parts = _aesthetic_parts(measure(x))
        return {k: v.reshape(-1, t).mean(1).float() for k, v in parts.items()}

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        x, _, t = _frames(samples, prompts, type(self).__name__, parse=False)
        p = _aesthetic_parts(measure(x))
        score = (p["contrast"] * p["sharpness"] * p["clean"]).clamp(min=0).pow(1 / 3)
        return torch.nan_to_num(score.reshape(-1, t).mean(1), nan=0.0).float().to(samples.device)


class MotionReward(_Reward):
    """Video motion quality in [0, 1]: the tracked object follows the asked motion, smoothly.

    The object is tracked frame by frame (centre of its box, and its size as
    sqrt(width x height)); its path relative to the first frame is compared with the path
    the motion prescribes (``renderer.motion_offsets``: e.g. "moving right" travels 0.25 of
    the side, "bouncing" rises 0.15 twice, "growing" scales to 1.35x):

    * follow = ``exp(-e^2 / 2)``, e the RMS over frames of the deviation in units of
      ``position_tol`` (x and y) and ``scale_tol`` (log size): a still object asked to move
      right scores about 0.01, one moving the wrong way about 0;
    * smooth = ``exp(-j)``, j the RMS second difference (frame to frame acceleration) of the
      deviation in units of ``jerk_tol`` (position) and ``2 * jerk_tol`` (log size);
    * reward = presence * follow * (0.5 + 0.5 smooth), presence the fraction of frames in
      which an object is found.

    ``relative=True`` replaces follow by its share among every path the world knows (the
    still one and each of ``MOTIONS``): ``follow(asked) / sum_m follow(m)``, the posterior
    probability that the clip makes the asked motion when the deviation is Gaussian with the
    tolerances as standard deviation and every motion equally likely a priori. It judges
    what ``classify`` judges, softly: a clip that is closer to the asked path than to any other
    scores near 1 even if it moves too little or too far, which gives GRPO a training signal
    from the first clip that moves the right way (docs/shapes_video.md).

    ``still_credit`` (with ``relative``): a clip asked to move earns this share of its
    posterior of standing still, so one making another motion than asked scores below one that
    stays still. Without it both score about 0, and GRPO, rewarded for (say) growing on
    "growing" prompts and indifferent to it elsewhere, carries that motion over to every prompt.

    A prompt without a motion asks for a still object. Needs videos with at least 2 frames.
    """

    name = "motion"

    def __init__(self, *, position_tol: float = 0.05, scale_tol: float = 0.07, jerk_tol: float = 0.03,
                 relative: bool = False, still_credit: float = 0.0):
        for k, v in (("position_tol", position_tol), ("scale_tol", scale_tol), ("jerk_tol", jerk_tol)):
            if not v > 0:
                raise ValueError(f"MotionReward: {k} must be > 0, got {v}")
        if not isinstance(relative, bool):
            raise TypeError(f"MotionReward: relative must be a bool, got {relative!r}")
        self.position_tol, self.scale_tol, self.jerk_tol = float(position_tol), float(scale_tol), float(jerk_tol)
        if not 0.0 <= still_credit < 1.0 or (still_credit and not relative):
            raise ValueError(f"MotionReward: still_credit must be in [0, 1) and needs relative=True, "
                             f"got still_credit={still_credit!r}, relative={relative!r}")
        self.relative, self.still_credit = relative, float(still_credit)

    def _track(self, samples, prompts, fn: str, *, parse: bool = True):
        """The tracked path relative to the first frame (B, T, 3: dx, dy, log size), the
        presence (B,), the parsed specs and T."""
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"{fn}: samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.dim() != 5 or samples.shape[2] < 2:
            raise ValueError(f"{fn}: samples must be videos (B, 3, T, H, W) with T >= 2, "
                             f"got {tuple(samples.shape)}")
        x, specs, t = _frames(samples, prompts, fn, parse=parse)
        b = x.shape[0] // t
        m = measure(x)
        bx, by = m["bx"].reshape(b, t), m["by"].reshape(b, t)
        size = ((m["width"] * m["height"]).sqrt() / 2).reshape(b, t).clamp(min=1e-3)
        track = torch.stack([bx - bx[:, :1], by - by[:, :1], torch.log(size / size[:, :1])], dim=-1)
        return track, m["found"].float().reshape(b, t).mean(1), specs, t

    def _deviation(self, track: torch.Tensor, motions: Sequence[str | None]) -> torch.Tensor:
        """(B, T, 3) deviation of ``track`` from the paths of ``motions`` in units of the tolerances."""
        b, t = track.shape[:2]
        dx, dy, scale = motion_offsets(list(motions), torch.linspace(0, 1, t).expand(b, t))
        want = torch.stack([dx, dy, torch.log(scale)], dim=-1)
        return track - want

    def _tol(self) -> torch.Tensor:
        return torch.tensor([self.position_tol, self.position_tol, self.scale_tol])

    def classify(self, samples: torch.Tensor) -> list[str | None]:
        """The motion each video makes: the one of ``MOTIONS`` (or ``None``, still) whose path
        the tracked object follows most closely (least mean squared deviation)."""
        track, _, _, _ = self._track(samples, None, "MotionReward.classify", parse=False)
        return self._classify(track)

    def _errors(self, track: torch.Tensor) -> torch.Tensor:
        """(B, 1 + len(MOTIONS)) mean squared deviation (tolerance units) from the still path,
        then from each of ``MOTIONS``; inf where the object was never found."""
        err = torch.stack([(self._deviation(track, [m] * track.shape[0]) / self._tol()).pow(2).sum(-1).mean(1)
                           for m in (None, *MOTIONS)], 1)
        return torch.nan_to_num(err, nan=math.inf)

    def _classify(self, track: torch.Tensor) -> list[str | None]:
        candidates = [None, *MOTIONS]
        return [candidates[i] for i in self._errors(track).argmin(1).tolist()]

    def correct(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) bool: the video makes the asked motion (``classify`` names it) with the object
        found in at least half of the frames."""
        track, presence, specs, _ = self._track(samples, prompts, "MotionReward.correct")
        made = self._classify(track)
        ok = torch.tensor([m == s.motion for m, s in zip(made, specs, strict=True)]) & (presence >= 0.5)
        return ok.to(samples.device)

    def components(self, samples: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``presence``, ``follow``, ``smooth``: (B,) float32 (CPU)."""
        track, presence, specs, t = self._track(samples, prompts, type(self).__name__)
        b = len(specs)
        dev = self._deviation(track, [s.motion for s in specs])              # (B, T, 3)
        if self.relative:   # softmax over every path, in log space (far-off clips underflow exp)
            asked = torch.tensor([(None, *MOTIONS).index(s.motion) for s in specs])
            posterior = torch.softmax(-0.5 * self._errors(track), dim=1)
            follow = posterior.gather(1, asked[:, None])[:, 0] + self.still_credit * (asked > 0) * posterior[:, 0]
        else:
            follow = torch.exp(-0.5 * (dev / self._tol()).pow(2).sum(-1).mean(1))
        if t >= 3:
            jerk = dev[:, 2:] - 2 * dev[:, 1:-1] + dev[:, :-2]
            jtol = torch.tensor([self.jerk_tol, self.jerk_tol, 2 * self.jerk_tol])
            smooth = torch.exp(-(jerk / jtol).pow(2).sum(-1).mean(1).sqrt())
        else:
            smooth = torch.ones(b)
        clean = lambda v: torch.nan_to_num(v, nan=0.0).float()
        return {"presence": clean(presence), "follow": clean(follow), "smooth": clean(smooth)}

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        c = self.components(samples, prompts)
        return (c["presence"] * c["follow"] * (0.5 + 0.5 * c["smooth"])).to(samples.device)


class JpegCompressibilityReward(_Reward):
    """DDPO's compressibility reward: minus the JPEG size in kB (1000 bytes) at ``quality``,
    averaged over a video's frames. Range (-inf, 0]; a flat 32x32 frame is about -0.6.
    Pixels are quantised to 8 bits, as a saved image would be. ``prompts`` is not used.
    """

    name = "jpeg_compressibility"
    range = (-math.inf, 0.0)

    def __init__(self, quality: int = 95):
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"JpegCompressibilityReward: quality must be an int in [1, 100], got {quality!r}")
        self.quality = quality

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        from PIL import Image  # local: only this reward needs PIL

        x, _, t = _frames(samples, prompts, type(self).__name__, parse=False)
        x = torch.nan_to_num(x, nan=0.5, posinf=1.0, neginf=0.0).clamp(0, 1)
        pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        sizes = []
        for frame in pixels:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        kb = torch.tensor(sizes, dtype=torch.float32).reshape(-1, t).mean(1)
        return (-kb).to(samples.device)

