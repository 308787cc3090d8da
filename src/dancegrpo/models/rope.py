"""3-D rotary position embedding (RoPE) for video tokens.

The head dimension D is split into three sections (t, h, w); each section rotates its channel
pairs by angles proportional to the token's frame, row or column index:

    angle[n, i] = pos_axis(i)[n] * theta ** (-2 j / d_axis)      (j-th pair of that section)
    (x_2i, x_2i+1) -> (x_2i cos - x_2i+1 sin, x_2i sin + x_2i+1 cos)

A rotation by angle(p) applied to q at position p and to k at position p' leaves
<R(p) q, R(p') k> = <q, R(p' - p) k>: attention scores depend only on the 3-D offset, which is
what lets one model run at any number of frames and any resolution.

Sections: h and w get 2 * (D // 6) channels each and t the rest (the split Wan uses; at
D = 128: 44, 42, 42). An image sits at t = 0, where the t section is the identity. The angles
are computed in fp32 and the rotation runs in fp32, whatever the activation dtype: bf16 angles
lose the position of late tokens.
"""

from __future__ import annotations

import math

import torch


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dimension given to (t, h, w); each is even and they sum to head_dim."""
    if not isinstance(head_dim, int) or head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim must be an even int >= 6 for 3-D RoPE, got {head_dim!r}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                device: torch.device | str | None = None,
                offset: tuple[int, int, int] = (0, 0, 0),
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotation angles of every token of a (T, H, W) token grid.

    Returns (T*H*W, head_dim // 2) in ``dtype`` (fp32 in the model; fp64 lets the tests check
    the math without rounding), tokens in (t, h, w) row-major order (the order patchify
    flattens them in). ``offset`` shifts every position (a model always starts at 0).
    """
    sections = rope_sections(head_dim)
    per_axis = []
    for size, start, d in zip(grid, offset, sections, strict=True):
        pos = torch.arange(start, start + size, device=device, dtype=dtype)
        inv_freq = theta ** (-torch.arange(0, d, 2, device=device, dtype=dtype) / d)
        per_axis.append(torch.outer(pos, inv_freq))  # (size, d / 2)
    t, h, w = grid
    at, ah, aw = per_axis
    angles = torch.cat([
        at[:, None, None, :].expand(t, h, w, at.shape[1]),
        ah[None, :, None, :].expand(t, h, w, ah.shape[1]),
        aw[None, None, :, :].expand(t, h, w, aw.shape[1]),
    ], dim=-1)
    return angles.reshape(t * h * w, head_dim // 2)


def rope_freqs(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """exp(i * angle) of ``rope_angles``: (T*H*W, head_dim // 2) complex64 (complex128 for
    dtype=float64). Computed once per forward and shared by every block."""
    angles = rope_angles(grid, head_dim, theta, device, dtype=dtype)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs (x_2i, x_2i+1) of ``x`` (B, N, heads, D) by per-token angles.

    freqs: (N, D // 2) complex, from ``rope_freqs``. The pair is read as the complex number
    x_2i + i x_2i+1 and multiplied by freqs (one complex multiply: 3.4x faster on CPU,
    forward + backward, than the cos/sin form with its stack). Computed in the precision of
    ``freqs`` (fp32, or fp64), returned in x.dtype.

    Equivalent PyTorch::

        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
    """
    if x.shape[1] != freqs.shape[0] or x.shape[-1] != 2 * freqs.shape[-1]:
        raise ValueError(f"apply_rope: x (B, N, heads, D) = {tuple(x.shape)} does not match "
                         f"freqs (N, D/2) = {tuple(freqs.shape)}")
    real = torch.float64 if freqs.dtype == torch.complex128 else torch.float32
    xc = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs[:, None, :]).flatten(-2).to(x.dtype)


def absolute_position_embedding(grid: tuple[int, int, int], dim: int, device=None) -> torch.Tensor:
    """Fixed sinusoidal embedding of each token's absolute (t, h, w) place, (T*H*W, dim) fp32.

    Coordinates are fractions of the grid ((i + 0.5) / n), so "the top of the frame" means the
    same at every resolution. RoPE alone only tells attention relative offsets; a small model
    given prompts such as "at the top" learns far faster with the absolute place added to its
    tokens (opt in with ``DiTConfig.absolute_pos``). Each axis gets an even share of ``dim``;
    leftover channels are zero.
    """
    per_axis = (dim // 3) // 2 * 2
    half = per_axis // 2
    freqs = math.pi * 2.0 ** torch.arange(half, device=device, dtype=torch.float32)
    parts = []
    for n in grid:
        coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
        angles = coords[:, None] * freqs[None]
        parts.append(torch.cat([angles.sin(), angles.cos()], dim=1))  # (n, per_axis)
    t, h, w = grid
    emb = torch.cat([parts[0][:, None, None].expand(t, h, w, per_axis),
                     parts[1][None, :, None].expand(t, h, w, per_axis),
                     parts[2][None, None, :].expand(t, h, w, per_axis)], dim=-1).reshape(t * h * w, 3 * per_axis)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb
