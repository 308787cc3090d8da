"""Procedural renderer of the shapes world: anti-aliased images and videos, vectorised in torch.

Each frame is one object over a flat background. The object is a signed distance function
(SDF) in units of its half-extent ``r``; a pixel's coverage is the SDF at the pixel centre
turned into a one-pixel linear ramp, ``clamp(0.5 - sdf_px, 0, 1)``, the usual analytic
approximation of the area of the pixel inside the shape (exact along straight edges), so
edge pixels carry intermediate values. Pixel = bg * (1 - coverage) + colour * coverage.

All frames of a batch (B scenes x T frames) are rasterised at once: 256 images of 32x32 take
a few milliseconds on one CPU core.

Jitter (from a ``torch.Generator``): the position moves by up to +-0.02 of the image side,
the size by up to +-6%, the travel of a moving or bouncing object by up to +-10%. Every
scene draws exactly four uniforms, in the same order for images and videos, so that
``first_frame(spec, generator=g)`` equals frame 0 of ``render_video(spec, generator=g')``
when ``g`` and ``g'`` are in the same state. ``generator=None`` renders the canonical scene,
without jitter.

Motion over frames (t = frame / (T - 1) in [0, 1]; the first frame is the named position):
moving left/right/up/down travels 0.25 of the image side; bouncing rises up to 0.15 above
its start and comes back twice (|sin(2 pi t)|); growing scales the object 1 -> 1.35,
shrinking 1 -> 0.6.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .grammar import BACKGROUNDS, COLORS, MOTIONS, POSITIONS, SHAPES, SIZES, SceneSpec

POSITION_JITTER = 0.02
SIZE_JITTER = 0.06
SPEED_JITTER = 0.10
TRAVEL = 0.25
BOUNCE_HEIGHT = 0.15
GROW_TO = 1.35
SHRINK_TO = 0.6
CROSS_ARM = 1.0 / 3.0  # half-width of a cross's arm, in units of its half-extent

_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_MOTION_INDEX = {m: i for i, m in enumerate(MOTIONS)}


def _check_specs(specs, fn: str) -> list[SceneSpec]:
    if isinstance(specs, SceneSpec):
        raise TypeError(f"{fn}: specs must be a sequence of SceneSpec, got a single SceneSpec")
    specs = list(specs)
    for s in specs:
        if not isinstance(s, SceneSpec):
            raise TypeError(f"{fn}: specs must hold SceneSpec, got {type(s).__name__}")
    return specs


def _check_size(size, fn: str) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise ValueError(f"{fn}: size must be an int >= 8 (pixels per side), got {size!r}")
    return size


def _check_frames(frames, fn: str) -> int:
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ValueError(f"{fn}: frames must be a positive int, got {frames!r}")
    return frames


def _jitter_draws(n: int, generator: torch.Generator | None, jitter: float) -> torch.Tensor:
    """(n, 4) uniforms in [-1, 1] scaled by ``jitter``: dx, dy, size, speed. Zeros without a generator."""
    if generator is None:
        return torch.zeros(n, 4)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return (torch.rand(n, 4, generator=generator) * 2 - 1) * float(jitter)


def motion_offsets(motions: Sequence[str | None], t: torch.Tensor, speed: torch.Tensor | float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each motion has taken the object at times ``t`` (B, T) in [0, 1].

    Returns ``(dx, dy, scale)``, each (B, T): the offset of the object's centre from its
    start (fractions of the side, y down) and its size relative to the start. ``speed``
    (B, 1) scales the travel of moving and bouncing objects. ``None`` stays still. The
    motion reward compares tracked objects against these same curves.
    """
    idx = torch.tensor([-1 if m is None else _MOTION_INDEX[m] for m in motions], dtype=torch.long)[:, None]
    travel = TRAVEL * speed * t
    bounce = BOUNCE_HEIGHT * speed * torch.sin(2 * math.pi * t).abs()
    zero = torch.zeros_like(t)
    m = {name: idx == i for name, i in _MOTION_INDEX.items()}
    dx = torch.where(m["moving left"], -travel, torch.where(m["moving right"], travel, zero))
    dy = torch.where(m["moving up"], -travel, torch.where(m["moving down"], travel, zero))
    dy = torch.where(m["bouncing"], -bounce, dy)
    scale = torch.where(m["growing"], 1 + (GROW_TO - 1) * t,
                        torch.where(m["shrinking"], 1 + (SHRINK_TO - 1) * t, zero + 1))
    return dx, dy, scale


def scene_geometry(specs: Sequence[SceneSpec], frames: int = 1, *, generator: torch.Generator | None = None,
                   jitter: float = 1.0) -> dict[str, torch.Tensor]:
    """The per-frame geometry the renderer draws (ground truth for tests and rewards).

    Returns a dict of float32 tensors: ``cx``, ``cy`` (centre of the object's [-r, r]^2 box,
    fractions of the image side, y down) and ``r`` (half-extent, fraction), each (B, frames);
    ``shape`` (B,) long; ``color``, ``background`` (B, 3). With ``frames=1`` the motion is not
    applied (the first frame). Consumes four uniforms per scene from ``generator``.
    """
    specs = _check_specs(specs, "scene_geometry")
    frames = _check_frames(frames, "scene_geometry")
    n = len(specs)
    j = _jitter_draws(n, generator, jitter)
    base = torch.tensor([[*POSITIONS[s.position], SIZES[s.size]] for s in specs], dtype=torch.float32).reshape(n, 3)
    cx0 = base[:, 0] + POSITION_JITTER * j[:, 0]
    cy0 = base[:, 1] + POSITION_JITTER * j[:, 1]
    r0 = base[:, 2] * (1 + SIZE_JITTER * j[:, 2])
    speed = 1 + SPEED_JITTER * j[:, 3]

    t = torch.linspace(0, 1, frames) if frames > 1 else torch.zeros(1)
    motion = [s.motion for s in specs]
    dx, dy, scale = motion_offsets(motion, t.expand(n, frames), speed[:, None])
    cx = cx0[:, None] + dx
    cy = cy0[:, None] + dy
    r = r0[:, None] * scale
    return {
        "cx": cx, "cy": cy, "r": r,
        "shape": torch.tensor([_SHAPE_INDEX[s.shape] for s in specs], dtype=torch.long),
        "color": torch.tensor([COLORS[s.color] for s in specs], dtype=torch.float32).reshape(n, 3),
        "background": torch.tensor([BACKGROUNDS[s.background] for s in specs], dtype=torch.float32).reshape(n, 3),
    }


def shape_sdf(shape: int | str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a unit shape at (u, v), in units of its half-extent.

    Every shape fills the box [-1, 1]^2 it is drawn in (touching all four sides); the
    triangle points up (apex at v = -1, since v grows downwards).
    """
    name = SHAPES[shape] if isinstance(shape, int) else shape
    au, av = u.abs(), v.abs()
    if name == "circle":
        return torch.sqrt(u * u + v * v) - 1
    if name == "square":
        return torch.maximum(au, av) - 1
    if name == "diamond":
        return (au + av - 1) / math.sqrt(2)
    if name == "triangle":
        # Base v = 1; sides through the apex (0, -1) and the base corners (+-1, 1).
        return torch.maximum(v - 1, (2 * au - v - 1) / math.sqrt(5))
    if name == "cross":
        w = CROSS_ARM
        return torch.minimum(torch.maximum(au - 1, av - w), torch.maximum(au - w, av - 1))
    raise ValueError(f"shape_sdf: unknown shape {shape!r}; expected one of {list(SHAPES)}")


def rasterize(cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, shape: torch.Tensor, color: torch.Tensor,
              background: torch.Tensor, size: int) -> torch.Tensor:
    """Draw N frames: cx, cy, r (N,) fractions; shape (N,) long; color, background (N, 3).

    Returns (N, 3, size, size) float32 in [0, 1].
    """
    n = cx.shape[0]
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    u = (grid[None, None, :] - cx[:, None, None]) / r[:, None, None]   # (N, 1, W)
    v = (grid[None, :, None] - cy[:, None, None]) / r[:, None, None]   # (N, H, 1)
    u, v = torch.broadcast_tensors(u, v)
    sdf = torch.empty(n, size, size)
    for k in range(len(SHAPES)):
        sel = shape == k
        if bool(sel.any()):
            sdf[sel] = shape_sdf(k, u[sel], v[sel])
    # SDF in pixels = sdf * r * size; a one-pixel ramp centred on the edge.
    cover = (0.5 - sdf * (r * size)[:, None, None]).clamp_(0, 1)[:, None]
    return torch.lerp(background[:, :, None, None], color[:, :, None, None], cover)


def render_batch(specs: Sequence[SceneSpec], size: int = 32, *, frames: int = 8, video: bool | None = None,
                 generator: torch.Generator | None = None, jitter: float = 1.0) -> torch.Tensor:
    """Render a batch of scenes.

    Images: (B, 3, size, size); videos: (B, 3, frames, size, size); float32 in [0, 1].
    ``video=None`` renders videos when the scenes have motions (they must agree); an image
    of a scene with a motion is its first frame; a video of a scene without one is still.
    """
    specs = _check_specs(specs, "render_batch")
    size = _check_size(size, "render_batch")
    if video is None:
        kinds = {s.motion is not None for s in specs}
        if len(kinds) > 1:
            raise ValueError("render_batch: specs mix scenes with and without motion; pass video=True or False")
        video = kinds == {True}
    t = _check_frames(frames, "render_batch") if video else 1
    g = scene_geometry(specs, t, generator=generator, jitter=jitter)
    n = len(specs)
    pix = rasterize(g["cx"].reshape(-1), g["cy"].reshape(-1), g["r"].reshape(-1),
                    g["shape"].repeat_interleave(t), g["color"].repeat_interleave(t, dim=0),
                    g["background"].repeat_interleave(t, dim=0), size)
    if not video:
        return pix
    return pix.reshape(n, t, 3, size, size).transpose(1, 2).contiguous()


def render_image(spec: SceneSpec, size: int = 32, *, generator: torch.Generator | None = None,
                 jitter: float = 1.0) -> torch.Tensor:
    """One image (3, size, size) in [0, 1]; a scene with a motion gives its first frame."""
    return render_batch([spec], size, video=False, generator=generator, jitter=jitter)[0]


def render_video(spec: SceneSpec, frames: int = 8, size: int = 32, *, generator: torch.Generator | None = None,
                 jitter: float = 1.0) -> torch.Tensor:
    """One video (3, frames, size, size) in [0, 1] with the scene's motion realised."""
    return render_batch([spec], size, frames=frames, video=True, generator=generator, jitter=jitter)[0]


def first_frame(spec: SceneSpec, size: int = 32, *, generator: torch.Generator | None = None,
                jitter: float = 1.0) -> torch.Tensor:
    """The first frame (3, size, size) of ``render_video(spec, ...)`` with the same generator state
    (the image an image-to-video model is given)."""
    return render_image(spec, size, generator=generator, jitter=jitter)


def first_frames(specs: Sequence[SceneSpec], size: int = 32, *, generator: torch.Generator | None = None,
                 jitter: float = 1.0) -> torch.Tensor:
    """Batched ``first_frame``: (B, 3, size, size)."""
    return render_batch(specs, size, video=False, generator=generator, jitter=jitter)
