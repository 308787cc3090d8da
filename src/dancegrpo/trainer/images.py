"""Pictures a run writes, drawn with PIL only: sample grids (PNG), video grids (GIF), reward curve.

Tiny samples (the toy world's 4x4) are upscaled with nearest neighbour so a grid is readable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["save_grid", "save_reward_curve", "grid_frames"]


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8."""
    t = frames.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return t.movedim(-3, -1).numpy()


def grid_frames(samples: torch.Tensor, columns: int | None = None, min_size: int = 64, pad: int = 2) -> list[Image.Image]:
    """Arrange (B, 3, H, W) images or (B, 3, T, H, W) videos in a grid; one PIL image per frame."""
    if samples.dim() == 4:
        samples = samples.unsqueeze(2)
    if samples.dim() != 5 or samples.shape[1] != 3:
        raise ValueError(f"samples must be (B, 3, H, W) or (B, 3, T, H, W), got {tuple(samples.shape)}")
    b, _, t, h, w = samples.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    scale = max(1, math.ceil(min_size / max(h, w)))
    hh, ww = h * scale, w * scale
    pixels = _to_uint8(samples.permute(0, 2, 1, 3, 4))  # (B, T, H, W, 3)
    frames = []
    for f in range(t):
        canvas = Image.new("RGB", (cols * (ww + pad) + pad, rows * (hh + pad) + pad), (40, 40, 40))
        for i in range(b):
            tile = Image.fromarray(pixels[i, f]).resize((ww, hh), Image.NEAREST)
            canvas.paste(tile, (pad + (i % cols) * (ww + pad), pad + (i // cols) * (hh + pad)))
        frames.append(canvas)
    return frames


def save_grid(samples: torch.Tensor, path, columns: int | None = None, fps: int = 4) -> Path:
    """Write a PNG grid of images, or an animated GIF grid of videos (``path``'s suffix is set)."""
    frames = grid_frames(samples, columns)
    path = Path(path)
    if len(frames) == 1:
        path = path.with_suffix(".png")
        frames[0].save(path)
    else:
        path = path.with_suffix(".gif")
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


_EXTRA_COLOURS = ((20, 140, 60), (230, 130, 0), (130, 40, 170), (0, 150, 170), (120, 120, 120))


def save_reward_curve(steps: Sequence[int], rewards: Sequence[float], path, title: str = "reward_mean",
                      size: tuple[int, int] = (640, 360), extra: dict | None = None) -> Path:
    """A line plot of reward per step (raw, and a moving average) as PNG. ``extra``: name ->
    values per step (None where not measured), e.g. the held-out rewards, drawn on the same axes
    as dots joined by lines, with a legend: reward hacking shows as the two curves parting."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    pts = [(s, r) for s, r in zip(steps, rewards, strict=True) if r is not None and math.isfinite(r)]
    series = {name: [(s, r) for s, r in zip(steps, vals, strict=True) if r is not None and math.isfinite(r)]
              for name, vals in (extra or {}).items()}
    series = {k: v for k, v in series.items() if v}
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        all_y = ys + [r for v in series.values() for _, r in v]
        y0, y1 = min(all_y), max(all_y)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.5, y1 + 0.5
        px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
        py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
        for frac in (0.0, 0.5, 1.0):  # y ticks
            yv = y0 + frac * (y1 - y0)
            d.line([left - 4, py(yv), left, py(yv)], fill="black")
            d.text((4, py(yv) - 6), f"{yv:.3g}", fill="black")
        d.text((left, h - bottom + 6), str(x0), fill="black")
        d.text((w - right - 30, h - bottom + 6), str(max(xs)), fill="black")
        d.text(((w - 40) // 2, h - bottom + 20), "step", fill="black")
        line = [(px(x), py(y)) for x, y in pts]
        if len(line) > 1:
            d.line(line, fill=(150, 170, 230), width=1)
        window = max(1, len(ys) // 10)
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
        sline = [(px(x), py(y)) for x, y in zip(xs, smooth, strict=True)]
        if len(sline) > 1:
            d.line(sline, fill=(200, 30, 30), width=2)
        else:
            d.ellipse([sline[0][0] - 2, sline[0][1] - 2, sline[0][0] + 2, sline[0][1] + 2], fill=(200, 30, 30))
        for k, (name, v) in enumerate(series.items()):
            colour = _EXTRA_COLOURS[k % len(_EXTRA_COLOURS)]
            line = [(px(x), py(y)) for x, y in v]
            if len(line) > 1:
                d.line(line, fill=colour, width=2)
            for cx, cy in line:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            d.text((w - right - 200, top + 4 + 12 * k), name, fill=colour)
    path = Path(path)
    img.save(path)
    return path
