"""Building blocks of the video DiT: embeddings, adaLN-Zero modulation, attention layers and
the two transformer block kinds (cross-attention to text, or MM-DiT joint attention).

Conventions: tokens are (B, N, hidden); heads are split as (B, N, heads, head_dim), the layout
``attention`` takes. Normalisations compute in fp32 and return the input dtype, so a bf16 or
fp16 model (or autocast) keeps its activations in low precision without losing the statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .rope import apply_rope

# Modulation parameters per stream: shift, scale, gate before attention; the same before the MLP.
MOD_ATTN_MLP = 6


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, C) * (1 + scale (B, C)) + shift (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learnt gain; fp32 statistics, input dtype out."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 (bf16 statistics over wide hidden sizes drift), input dtype out."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps t (B,) (any float, here 1000 * sigma): (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLP(nn.Module):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim_out or dim_in)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedding(nn.Module):
    """Sinusoid of the timestep through a SiLU MLP (DiT): (B,) -> (B, hidden)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, t):
        emb = timestep_sinusoid(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(emb)))


class Modulation(nn.Module):
    """The adaLN parameters of one block stream: (B, n, hidden).

    ``shared=False`` (DiT's adaLN-Zero): the block's own Linear(hidden, n * hidden) of the
    conditioning. ``shared=True`` (PixArt-alpha's adaLN-single, Wan): one projection computed
    by the model for all blocks plus this block's learnt (n, hidden) offset, which saves
    n * hidden^2 parameters per block (425M at Wan-1.3B widths). ``VideoDiT`` zero-initialises
    both, so every gate is 0 and every block is the identity at initialisation.
    """

    def __init__(self, hidden: int, n: int, shared: bool):
        super().__init__()
        self.n = n
        if shared:
            self.table = nn.Parameter(torch.zeros(n, hidden))
            self.proj = None
        else:
            self.table = None
            self.proj = nn.Linear(hidden, n * hidden)

    def forward(self, c_act: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """c_act: SiLU of the conditioning (B, hidden); shared: (B, >= n, hidden) or None."""
        if self.proj is not None:
            return self.proj(c_act).unflatten(-1, (self.n, -1))
        if shared is None:
            raise ValueError("Modulation(shared=True) needs the model's shared modulation, got None")
        return shared[:, : self.n] + self.table.to(shared.dtype)


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys (SD3/FLUX), or nothing when disabled."""

    def __init__(self, head_dim: int, enabled: bool, with_q: bool = True):
        super().__init__()
        self.q = RMSNorm(head_dim) if enabled and with_q else nn.Identity()
        self.k = RMSNorm(head_dim) if enabled else nn.Identity()


def _heads(x: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, n * heads * D) -> n tensors (B, N, heads, D)."""
    return x.unflatten(-1, (n, heads, -1)).unbind(2)


class SelfAttention(nn.Module):
    """Self-attention over video tokens with QK-norm and 3-D RoPE."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads, qk_norm)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, rope, backend, sp=None):
        """sp: a ``TokenShard`` when the sequence is split over ranks (x holds this rank's
        tokens, rope their rows): all-to-all to all tokens x this rank's heads and back."""
        q, k, v = _heads(self.qkv(x), 3, self.heads)
        q, k = apply_rope(self.norm.q(q), rope), apply_rope(self.norm.k(k), rope)
        if sp is None:
            return self.proj(attention(q, k, v, None, backend).flatten(2))
        q, k, v = sp.to_heads(q), sp.to_heads(k), sp.to_heads(v)
        out = attention(q, k, v, sp.key_mask(q.shape[0], q.device), backend)
        return self.proj(sp.to_tokens(out).flatten(2))


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens (no RoPE: text has no place in the video grid).

    ``VideoDiT`` zero-initialises the output projection (this path has no gate), so a block is
    the identity at initialisation.
    """

    def __init__(self, hidden: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.norm = QKNorm(hidden // heads, qk_norm)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, ctx, ctx_mask, backend):
        q = self.q(x).unflatten(-1, (self.heads, -1))
        k, v = _heads(self.kv(ctx), 2, self.heads)
        q, k = self.norm.q(q), self.norm.k(k)
        k, v = k.to(q.dtype), v.to(q.dtype)
        return self.proj(attention(q, k, v, ctx_mask, backend).flatten(2))


class CrossBlock(nn.Module):
    """adaLN-Zero DiT block with cross-attention to text (PixArt-alpha / Wan layout)::

        x += gate1 * SelfAttn(modulate(LN(x), shift1, scale1))
        x += CrossAttn(LN_affine(x), text)
        x += gate2 * MLP(modulate(LN(x), shift2, scale2))
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool, shared_mod: bool):
        super().__init__()
        self.mod = Modulation(hidden, MOD_ATTN_MLP, shared_mod)
        self.norm1 = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden, heads, qk_norm)
        self.norm_cross = LayerNorm32(hidden, eps=1e-6)
        self.cross = CrossAttention(hidden, heads, qk_norm)
        self.norm2 = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(hidden, int(hidden * mlp_ratio))

    def forward(self, x, c_act, shared, text, text_mask, rope, backend, sp=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(c_act, shared).unbind(1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope, backend, sp)
        x = x + self.cross(self.norm_cross(x), text, text_mask, backend)
        x = x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x


class JointBlock(nn.Module):
    """MM-DiT block (SD3): video and text streams with their own weights and modulation,
    one attention over the concatenated tokens [video; text] with padded text masked out.

    RoPE rotates only the video tokens. Sequence-parallel (``sp``, a ``TokenShard``): the
    video q, k, v go all-to-all to all tokens x this rank's heads, the replicated text stream
    contributes the same heads, and the text output is gathered back to all heads. The last block's text output is never used, so its
    text stream keeps only what the video needs (keys and values), which leaves no parameter
    without a gradient (DDP's unused-parameter error).
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qk_norm: bool, shared_mod: bool,
                 text_out: bool = True):
        super().__init__()
        self.heads = heads
        self.text_out = text_out
        self.mod = Modulation(hidden, MOD_ATTN_MLP, shared_mod)
        self.norm1 = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.qk_norm = QKNorm(hidden // heads, qk_norm)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
        self.mlp = MLP(hidden, int(hidden * mlp_ratio))

        self.text_mod = Modulation(hidden, MOD_ATTN_MLP if text_out else 2, shared_mod)
        self.text_norm1 = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
        self.text_qkv = nn.Linear(hidden, (3 if text_out else 2) * hidden)
        self.text_qk_norm = QKNorm(hidden // heads, qk_norm, with_q=text_out)
        if text_out:
            self.text_proj = nn.Linear(hidden, hidden)
            self.text_norm2 = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
            self.text_mlp = MLP(hidden, int(hidden * mlp_ratio))

    def forward(self, x, text, c_act, shared, shared_text, text_mask, rope, backend, sp=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.mod(c_act, shared).unbind(1)
        q, k, v = _heads(self.qkv(modulate(self.norm1(x), sh1, sc1)), 3, self.heads)
        q, k = apply_rope(self.qk_norm.q(q), rope), apply_rope(self.qk_norm.k(k), rope)
        heads = (lambda t: t) if sp is None else sp.head_slice
        video_mask = None
        if sp is not None:
            q, k, v = sp.to_heads(q), sp.to_heads(k), sp.to_heads(v)
            video_mask = sp.key_mask(x.shape[0], x.device)
        n = q.shape[1]

        tmod = self.text_mod(c_act, shared_text).unbind(1)
        th = modulate(self.text_norm1(text), tmod[0], tmod[1])
        if self.text_out:
            tq, tk, tv = _heads(self.text_qkv(th), 3, self.heads)
            q = torch.cat([q, heads(self.text_qk_norm.q(tq)).to(q.dtype)], dim=1)
        else:
            tk, tv = _heads(self.text_qkv(th), 2, self.heads)
        k = torch.cat([k, heads(self.text_qk_norm.k(tk)).to(k.dtype)], dim=1)
        v = torch.cat([v, heads(tv).to(v.dtype)], dim=1)
        mask = None
        if text_mask is not None or video_mask is not None:
            b, nt = x.shape[0], text.shape[1]
            mask = torch.cat([video_mask if video_mask is not None else q.new_ones(b, n, dtype=torch.bool),
                              text_mask if text_mask is not None else q.new_ones(b, nt, dtype=torch.bool)], dim=1)
        out = attention(q, k, v, mask, backend)
        video_out, text_out = out[:, :n], out[:, n:]
        if sp is not None:
            video_out = sp.to_tokens(video_out)
            text_out = sp.gather_heads(text_out) if self.text_out else None

        x = x + g1[:, None] * self.proj(video_out.flatten(2))
        x = x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))
        if not self.text_out:
            return x, None
        _, _, tg1, tsh2, tsc2, tg2 = tmod
        text = text + tg1[:, None] * self.text_proj(text_out.flatten(2))
        text = text + tg2[:, None] * self.text_mlp(modulate(self.text_norm2(text), tsh2, tsc2))
        return x, text


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch values (``VideoDiT`` zero-initialises both,
    so the untrained model predicts exactly 0)."""

    def __init__(self, hidden: int, patch_values: int):
        super().__init__()
        self.norm = LayerNorm32(hidden, eps=1e-6, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.linear = nn.Linear(hidden, patch_values)

    def forward(self, x, c_act):
        shift, scale = self.mod(c_act).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
