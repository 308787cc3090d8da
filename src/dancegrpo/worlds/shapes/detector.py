"""A deterministic, weight-free detector of the one object in a shapes-world frame.

Batched over frames (a reward scores hundreds of frames at once). For each frame:

1. Background: the per-channel median of the border pixels (robust to an object touching it).
2. Foreground: pixels whose RGB distance to the background exceeds half the frame's robust
   maximum distance (its 4th largest), and at least ``min_contrast``. A 3x3 majority filter
   of that mask, grown by 2 pixels, is the region of interest: it keeps isolated noise
   pixels (and the empty corners a bounding box would add) away from the measurements.
3. Colour: the mean RGB of the object's core (foreground pixels at least as far from the
   background as their median), so anti-aliased edges, which mix in the background, do not
   pull it; the name is the nearest of ``COLORS``.
4. Coverage ``alpha``: each pixel projected on the background -> colour line (the inverse of
   the renderer's blend), with a 0.1 dead zone at both ends against noise.
5. Scale- and position-invariant shape features from ``alpha``:
   * ``fill``: area / (soft width x soft height), where the soft width is the sum over
     columns of the column's largest coverage (exact for anti-aliased edges): square 1,
     circle pi/4, triangle and diamond 1/2, cross 5/9.
   * ``drop``: how far the centroid sits below the centre of the box, over its height: an
     upward triangle 1/6, every other shape 0.
   * ``spread``: the polar moment (mu20 + mu02) / area^2: circle 1/(2 pi) (the minimum of
     any shape), square and diamond 1/6, cross and triangle about 0.19.
   The shape is the nearest prototype: the features of each shape as the renderer draws
   it at the frame's own size (a shape 6 pixels wide has visibly different features from
   its continuous values), measured by this same code on clean renders at several sizes
   and sub-pixel placements. Distances are in units combining ``SHAPE_FEATURE_SCALE`` with
   the spread over placements. No learned weights: the prototypes are computed, once per
   process (about 0.1 to 0.7 s), from the renderer's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .grammar import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES

# Per-feature units of the shape distance (fill, drop, spread), added in quadrature to the
# prototypes' spread over sub-pixel placements: about a third of the gap between the
# closest pair of prototypes on each feature, so clean renders sit well inside their
# prototype's basin and the soft shape score falls off smoothly.
SHAPE_FEATURE_SCALE = (0.05, 0.04, 0.006)
COLOR_TABLE = torch.tensor(list(COLORS.values()), dtype=torch.float32)
BACKGROUND_TABLE = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)
POSITION_TABLE = torch.tensor(list(POSITIONS.values()), dtype=torch.float32)
# Between the two named half-extents (geometric mean), in fractions of the image side.
SIZE_THRESHOLD = (SIZES["small"] * SIZES["large"]) ** 0.5
_DEAD_ZONE = 0.1


@dataclass
class Detection:
    """What the detector saw in one frame (python values; see :func:`detect`).

    found: whether there is an object at all (False for a blank or near-blank frame; the
    other fields then hold defaults). color / shape / size / position: the nearest names.
    centroid: (x, y) of the coverage-weighted centre, fractions of the side, y down.
    area: coverage area as a fraction of the frame. extent: (width, height), fractions.
    rgb: the object's estimated colour; background_rgb the background's; contrast their
    RGB distance. features: fill, drop, spread (see the module docstring).
    """

    found: bool
    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    background: str
    centroid: tuple[float, float]
    area: float
    extent: tuple[float, float]
    rgb: tuple[float, float, float]
    background_rgb: tuple[float, float, float]
    contrast: float
    features: dict[str, float]


def _as_frames(images: torch.Tensor, fn: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{fn}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{fn}: images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[2] < 8 or images.shape[3] < 8:
        raise ValueError(f"{fn}: images must be at least 8x8, got {tuple(images.shape[2:])}")
    # Samples can be slightly out of range or non-finite: clamp, never propagate NaN.
    x = images.detach().to("cpu", torch.float32)
    return torch.nan_to_num(x, nan=0.5, posinf=1.0, neginf=0.0).clamp_(0, 1)


def measure(images: torch.Tensor, *, min_contrast: float = 0.15) -> dict[str, torch.Tensor]:
    """Batched detector measurements of frames (N, 3, H, W) in [0, 1] (clamped; NaN-safe).

    Returns a dict of CPU tensors, each with N first: ``found`` (bool), ``rgb`` (N, 3),
    ``background_rgb`` (N, 3), ``contrast``, ``area`` (fraction of the frame), ``cx``, ``cy``
    (coverage centroid), ``bx``, ``by`` (centre of the object's box), ``width``, ``height``
    (soft extents), all fractions of the side; ``half_extent_px`` (sqrt(width x height) / 2
    in pixels); ``fill``, ``drop``, ``spread`` (shape features); ``alpha`` (N, H, W) coverage; ``object_mask`` (N, H, W) bool (the region of
    interest); ``background_std`` (std of the pixels outside it, over channels).
    """
    if not 0 < min_contrast < 1:
        raise ValueError(f"measure: min_contrast must be in (0, 1), got {min_contrast}")
    x = _as_frames(images, "measure")
    n, _, h, w = x.shape
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    bg = border.median(dim=2).values                                       # (N, 3)
    diff = x - bg[:, :, None, None]
    dist = diff.pow(2).sum(1).sqrt()  # (N, H, W); vector_norm over dim 1 is slow on CPU
    flat = dist.reshape(n, -1)
    robust_max = flat.topk(min(4, flat.shape[1]), dim=1).values[:, -1]
    thr = torch.clamp(0.5 * robust_max, min=min_contrast)
    mask0 = dist > thr[:, None, None]
    votes = F.avg_pool2d(mask0[:, None].float(), 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    core_mask = votes > 0.5
    core_mask = torch.where(core_mask.flatten(1).any(1)[:, None, None], core_mask, mask0)
    # Within 2 pixels of the majority-filtered mask: recovers the edge pixels and thin tips
    # the filter ate, and nothing far away (a box would add its empty corners' noise).
    roi = F.max_pool2d(core_mask[:, None].float(), 5, stride=1, padding=2)[:, 0] > 0
    fg = mask0 & roi
    found = fg.flatten(1).sum(1) >= 3

    # Colour of the core: foreground pixels at least as far from the background as their median.
    dfg = torch.where(fg, dist, torch.nan).reshape(n, -1)
    med = torch.nanmedian(dfg, dim=1).values.nan_to_num(0.0)
    core = (fg & (dist >= med[:, None, None])).float()
    core_n = core.flatten(1).sum(1).clamp(min=1)
    rgb = (x * core[:, None]).flatten(2).sum(2) / core_n[:, None]
    rgb = torch.where(found[:, None], rgb, bg)
    axis = rgb - bg
    contrast = axis.norm(dim=1)
    proj = (diff * axis[:, :, None, None]).sum(1) / contrast.pow(2).clamp(min=1e-6)[:, None, None]
    keep = roi & found[:, None, None]
    alpha = ((proj - _DEAD_ZONE) / (1 - 2 * _DEAD_ZONE)).clamp(0, 1) * keep

    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    area = alpha.flatten(1).sum(1)
    safe_area = area.clamp(min=1e-6)
    cx = (alpha.sum(1) * xs).sum(1) / safe_area
    cy = (alpha.sum(2) * ys).sum(1) / safe_area
    mu20 = (alpha.sum(1) * (xs[None] - cx[:, None]) ** 2).sum(1)
    mu02 = (alpha.sum(2) * (ys[None] - cy[:, None]) ** 2).sum(1)
    colmax, rowmax = alpha.amax(1), alpha.amax(2)
    width, height = colmax.sum(1), rowmax.sum(1)
    bx = (colmax * xs).sum(1) / width.clamp(min=1e-6)
    by = (rowmax * ys).sum(1) / height.clamp(min=1e-6)
    fill = area / (width * height).clamp(min=1e-6)
    drop = (cy - by) / height.clamp(min=1e-6)
    spread = (mu20 + mu02) / safe_area.pow(2)

    # Background cleanliness from the pixels away from the object; where the "object" covers
    # most of the frame (noise, clutter) there is no clean background to speak of: use all.
    # (3 pixels from the core, one more than the region of interest: the majority filter
    # eats a thin apex's faint anti-aliased tip, which is no dirt.)
    near = F.max_pool2d(core_mask[:, None].float(), 7, stride=1, padding=3)[:, 0] > 0
    outside = ~(near & found[:, None, None])
    sparse = outside.flatten(1).sum(1) < 0.25 * h * w
    outside = outside | sparse[:, None, None]
    out_n = outside.flatten(1).sum(1).clamp(min=1)
    out_mean = (x * outside[:, None]).flatten(2).sum(2) / out_n[:, None]
    out_var = (((x - out_mean[:, :, None, None]) ** 2) * outside[:, None]).flatten(2).sum(2) / out_n[:, None]
    side = float(max(h, w))
    return {
        "found": found, "rgb": rgb, "background_rgb": bg, "contrast": contrast * found,
        "area": area / (h * w), "cx": cx / w, "cy": cy / h, "bx": bx / w, "by": by / h,
        "width": width / side, "height": height / side, "half_extent_px": (width * height).sqrt() / 2,
        "fill": fill, "drop": drop, "spread": spread,
        "alpha": alpha, "object_mask": roi & found[:, None, None],
        "background_std": out_var.mean(1).sqrt(),
    }


# Half-extents (pixels) at which the prototypes are measured: a shape a few pixels wide
# has features that drift from its continuous values (pixels are coarse against its
# corners), so each frame is compared with the shapes as drawn at its own size.
_CALIBRATION_RADII = (2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 11.0, 16.0, 24.0)
_CALIBRATION_OFFSETS = (0.0, 0.25, 0.5, 0.75)


@lru_cache(maxsize=1)
def shape_prototypes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each shape's features as drawn by the renderer at several sizes, measured by
    :func:`measure` itself (so the definitions can never drift apart). No learned weights.

    Returns ``(extent, mean, std)``: ``extent`` (S, R) the measured half-extent in pixels
    of each shape drawn at each of R sizes (increasing); ``mean`` and ``std`` (S, R, 3) of
    the features (fill, drop, spread) over 16 sub-pixel placements.
    """
    from .renderer import rasterize  # local: scoring samples never needs the renderer otherwise

    canvas = 64
    rows = torch.tensor([(s, r, ox, oy) for s in range(len(SHAPES)) for r in _CALIBRATION_RADII
                         for ox in _CALIBRATION_OFFSETS for oy in _CALIBRATION_OFFSETS])
    n = rows.shape[0]
    frames = rasterize((canvas / 2 + rows[:, 2]) / canvas, (canvas / 2 + rows[:, 3]) / canvas, rows[:, 1] / canvas,
                       rows[:, 0].long(), torch.tensor([[0.9, 0.1, 0.1]]).expand(n, 3), torch.ones(n, 3), canvas)
    m = measure(frames)
    shape = (len(SHAPES), len(_CALIBRATION_RADII), len(_CALIBRATION_OFFSETS) ** 2)
    extent = m["half_extent_px"].reshape(shape).mean(2)
    all_feats = torch.stack([m["fill"], m["drop"], m["spread"]], dim=1).reshape(*shape, 3)
    return extent, all_feats.mean(2), all_feats.std(2)


def _prototypes_at(half_extent_px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each shape's prototype features and their placement spread, (N, S, 3) each, at
    each frame's size (linear in log size, held constant beyond the calibrated range)."""
    extent, feats, stds = shape_prototypes()
    out, spread = [], []
    q = half_extent_px.clamp(min=1e-3).log()
    for s in range(extent.shape[0]):
        e = extent[s].log()
        q_s = q.clamp(e[0], e[-1])
        hi = torch.searchsorted(e, q_s.contiguous()).clamp(1, e.shape[0] - 1)
        lo = hi - 1
        t = ((q_s - e[lo]) / (e[hi] - e[lo])).clamp(0, 1)[:, None]
        out.append(torch.lerp(feats[s][lo], feats[s][hi], t))
        spread.append(torch.lerp(stds[s][lo], stds[s][hi], t))
    return torch.stack(out, dim=1), torch.stack(spread, dim=1)


def shape_distances(m: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, len(SHAPES)) scaled feature distance of each frame to each shape prototype."""
    feats = torch.stack([m["fill"], m["drop"], m["spread"]], dim=1)
    proto, std = _prototypes_at(m["half_extent_px"])
    scale = (torch.tensor(SHAPE_FEATURE_SCALE).pow(2) + std.pow(2)).sqrt()
    return ((feats[:, None, :] - proto) / scale).norm(dim=2)


def color_distances(m: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, len(COLORS)) RGB distance of each frame's object colour to each named colour."""
    return torch.cdist(m["rgb"], COLOR_TABLE)


def classify(m: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nearest names as indices (N,) long: ``color`` (COLORS order), ``shape`` (SHAPES),
    ``size`` (0 small, 1 large), ``position`` (POSITIONS), ``background`` (BACKGROUNDS)."""
    half_extent = (m["width"] * m["height"]).sqrt() / 2
    centre = torch.stack([m["bx"], m["by"]], dim=1)
    return {
        "color": color_distances(m).argmin(1),
        "shape": shape_distances(m).argmin(1),
        "size": (half_extent > SIZE_THRESHOLD).long(),
        "position": torch.cdist(centre, POSITION_TABLE).argmin(1),
        "background": torch.cdist(m["background_rgb"], BACKGROUND_TABLE).argmin(1),
    }


def detect_batch(images: torch.Tensor) -> list[Detection]:
    """:func:`detect` for every frame of (N, 3, H, W)."""
    m = measure(images)
    c = classify(m)
    colors, sizes, positions, backgrounds = list(COLORS), list(SIZES), list(POSITIONS), list(BACKGROUNDS)
    out = []
    for i in range(m["found"].shape[0]):
        ok = bool(m["found"][i])
        out.append(Detection(
            found=ok,
            color=colors[c["color"][i]] if ok else None,
            shape=SHAPES[c["shape"][i]] if ok else None,
            size=sizes[c["size"][i]] if ok else None,
            position=positions[c["position"][i]] if ok else None,
            background=backgrounds[c["background"][i]],
            centroid=(float(m["cx"][i]), float(m["cy"][i])),
            area=float(m["area"][i]),
            extent=(float(m["width"][i]), float(m["height"][i])),
            rgb=tuple(float(v) for v in m["rgb"][i]),
            background_rgb=tuple(float(v) for v in m["background_rgb"][i]),
            contrast=float(m["contrast"][i]),
            features={k: float(m[k][i]) for k in ("fill", "drop", "spread")},
        ))
    return out


def detect(image: torch.Tensor) -> Detection:
    """Detect the object in one frame ``image`` (3, H, W), pixels in [0, 1] (clamped)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise ValueError(f"detect: image must be a (3, H, W) tensor, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return detect_batch(image[None])[0]
