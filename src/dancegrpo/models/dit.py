"""Our compact rectified-flow video DiT.

    x (B, C, T, H, W) --patchify (pt, ph, pw)--> tokens (B, N, hidden), N = T/pt * H/ph * W/pw
    c = TimestepMLP(sinusoid(1000 sigma)) + PooledMLP(pooled text)      (B, hidden)
    text tokens --MLP--> (B, L, hidden)
    depth x block(tokens | c, text)        CrossBlock or JointBlock, adaLN-Zero modulated, 3-D RoPE
    FinalLayer (adaLN + linear) --unpatchify--> velocity (B, C_out, T, H, W)

An image (B, C, H, W) is run as a one-frame video. Initialisation follows DiT: xavier linears,
then zeros for every modulation (gates 0: each block is the identity), the cross-attention
output projection, and the final layer, so the untrained model predicts exactly 0.

Image-to-video (``image_condition``): the first frame is broadcast over time and concatenated
as C extra input channels, plus one flag channel that is 1 on frame 0. Broadcasting (rather
than Wan's frame-0-only placement) puts the reference appearance in every token's own patch,
so even a tiny model with local patch embeddings sees, at each frame, what was at that place at
t = 0; the flag tells it which frame must reproduce the condition exactly.

Sequence parallelism (``set_sequence_parallel``) splits the tokens over a process group's
ranks with all-to-all attention (``dancegrpo.distributed.sequence_parallel``).

Activation checkpointing (``set_checkpointing``) recomputes chosen blocks in backward with
non-reentrant ``torch.utils.checkpoint``; it only acts in training mode with grad enabled.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import BACKEND_NAMES
from .config import CHECKPOINTING_MODES, DiTConfig
from .layers import (
    MLP,
    MOD_ATTN_MLP,
    CrossBlock,
    FinalLayer,
    JointBlock,
    Modulation,
    TimestepEmbedding,
)
from .rope import absolute_position_embedding, rope_freqs

__all__ = ["VideoDiT", "DiTConfig"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class VideoDiT(nn.Module):
    """Rectified-flow transformer for images and videos (see the module docstring)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"VideoDiT: config must be a DiTConfig, got {type(config).__name__}")
        self.config = cfg = replace(config)  # our own copy: set_checkpointing edits it
        hid = cfg.hidden_size
        pt, ph, pw = cfg.patch_size
        shared = cfg.modulation == "shared"

        self.patch_embed = nn.Linear(cfg.input_channels * pt * ph * pw, hid)
        self.frame_embed = nn.Parameter(torch.zeros(cfg.frame_embedding, hid)) if cfg.frame_embedding else None
        self.text_embed = MLP(cfg.text_dim, hid, hid)
        self.t_embed = TimestepEmbedding(hid, cfg.freq_dim)
        self.pooled_embed = MLP(cfg.text_dim, hid, hid)
        streams = 2 if cfg.joint_attention else 1
        self.shared_mod = nn.Linear(hid, streams * MOD_ATTN_MLP * hid) if shared else None
        if cfg.joint_attention:
            self.blocks = nn.ModuleList(
                JointBlock(hid, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, shared, text_out=i < cfg.depth - 1)
                for i in range(cfg.depth))
        else:
            self.blocks = nn.ModuleList(
                CrossBlock(hid, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, shared) for _ in range(cfg.depth))
        self.final = FinalLayer(hid, cfg.output_channels * pt * ph * pw)
        self._init_weights()
        self.set_checkpointing(cfg.checkpointing, cfg.checkpoint_every)
        self._sp = None

    # ------------------------------------------------------------------ setup
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        zero = [self.final.mod, self.final.linear]
        if self.shared_mod is not None:
            zero.append(self.shared_mod)
        for m in self.modules():
            if isinstance(m, Modulation):
                zero.append(m)
            elif isinstance(m, CrossBlock):
                zero.append(m.cross.proj)
        for m in zero:
            for p in m.parameters():
                nn.init.zeros_(p)

    def set_checkpointing(self, mode: str, every: int = 2) -> None:
        """Activation checkpointing: "none", "full" (every block) or "selective" (blocks
        0, every, 2*every, ...). Takes effect at the next forward; only in training mode."""
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"set_checkpointing: mode must be one of {list(CHECKPOINTING_MODES)}, got {mode!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"set_checkpointing: every must be a positive int, got {every!r}")
        self.config.checkpointing = mode
        self.config.checkpoint_every = every

    def set_attention_backend(self, backend: str) -> None:
        """Attention backend for later forwards: "auto", "flash", "xformers" or "sdpa"."""
        if backend not in BACKEND_NAMES:
            raise ValueError(f"set_attention_backend: backend must be one of {list(BACKEND_NAMES)}, got {backend!r}")
        self.config.attention_backend = backend

    def set_sequence_parallel(self, group) -> None:
        """Split every forward's video tokens over the ranks of ``group`` (a process group, a
        ``SequenceParallel``, or None to stop): Ulysses all-to-all attention, the output
        gathered on every rank. Every rank of the group must call forward with the same
        inputs. Parameter gradients are then partial per rank: sum them over the group
        (``dancegrpo.distributed.sequence_parallel.all_reduce_grads``)."""
        if group is None:
            self._sp = None
            return
        from ..distributed.sequence_parallel import SequenceParallel

        sp = group if isinstance(group, SequenceParallel) else SequenceParallel(group)
        sp.check_heads(self.config.num_heads, "set_sequence_parallel")
        self._sp = sp if sp.size > 1 else None

    @property
    def sequence_parallel(self):
        """The ``SequenceParallel`` handle in use, or None."""
        return self._sp

    def checkpointed_blocks(self) -> list[int]:
        """Indices of the blocks the current mode recomputes in backward."""
        mode, every = self.config.checkpointing, self.config.checkpoint_every
        if mode == "none":
            return []
        return [i for i in range(len(self.blocks)) if mode == "full" or i % every == 0]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x, timestep, text, text_mask, pooled, first_frame):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or not x.is_floating_point():
            raise ValueError("VideoDiT: x must be a float tensor (B, C, T, H, W) or (B, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        b, c = x.shape[:2]
        if c != cfg.in_channels:
            raise ValueError(f"VideoDiT: x must have {cfg.in_channels} channels (dim 1), got shape {tuple(x.shape)}")
        spatial = x.shape[2:] if x.dim() == 5 else (1, *x.shape[2:])
        if x.dim() == 4 and cfg.patch_size[0] != 1:
            raise ValueError(f"VideoDiT: an image x (B, C, H, W) needs patch_size[0] == 1, got {cfg.patch_size}")
        if any(s % p for s, p in zip(spatial, cfg.patch_size, strict=True)):
            raise ValueError(f"VideoDiT: x's (T, H, W) = {tuple(spatial)} must be divisible by patch_size {cfg.patch_size}")
        if cfg.frame_embedding and spatial[0] // cfg.patch_size[0] > cfg.frame_embedding:
            raise ValueError(f"VideoDiT: x has {spatial[0] // cfg.patch_size[0]} latent frames (T / patch_size[0]) but "
                             f"config.frame_embedding only embeds {cfg.frame_embedding}")
        if not isinstance(timestep, torch.Tensor) or timestep.shape not in ((b,), ()):
            raise ValueError(f"VideoDiT: timestep must be a tensor of shape ({b},) or (), got "
                             f"{tuple(timestep.shape) if isinstance(timestep, torch.Tensor) else type(timestep).__name__}")
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"VideoDiT: text must be (B, L, text_dim) = ({b}, L, {cfg.text_dim}), got "
                             f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
        if text_mask is not None:
            if not isinstance(text_mask, torch.Tensor) or text_mask.dtype != torch.bool:
                raise TypeError("VideoDiT: text_mask must be a bool tensor (True = real token)")
            if text_mask.shape != text.shape[:2]:
                raise ValueError(f"VideoDiT: text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        if pooled is not None and (not isinstance(pooled, torch.Tensor) or pooled.shape != (b, cfg.text_dim)):
            raise ValueError(f"VideoDiT: pooled must be (B, text_dim) = ({b}, {cfg.text_dim}) or None, got "
                             f"{tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__}")
        if cfg.image_condition:
            want = (b, c, *x.shape[-2:])
            if not isinstance(first_frame, torch.Tensor) or first_frame.shape != want:
                raise ValueError(f"VideoDiT: image_condition needs first_frame of shape (B, C, H, W) = {want}, got "
                                 f"{tuple(first_frame.shape) if isinstance(first_frame, torch.Tensor) else first_frame!r}")
        elif first_frame is not None:
            raise ValueError("VideoDiT: first_frame given but config.image_condition is False")

    def _patchify(self, v):
        b, c, t, h, w = v.shape
        pt, ph, pw = self.config.patch_size
        grid = (t // pt, h // ph, w // pw)
        v = v.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        return v.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, grid[0] * grid[1] * grid[2], -1), grid

    def _unpatchify(self, tokens, grid):
        b = tokens.shape[0]
        pt, ph, pw = self.config.patch_size
        co = self.config.output_channels
        v = tokens.reshape(b, *grid, co, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return v.reshape(b, co, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def embed(self, x: torch.Tensor, first_frame: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """The tokens entering the first block, (B, N, hidden), and the token grid (T', H', W'):
        patch embedding (of the latent, plus the first frame and its flag with image_condition),
        absolute position and frame embeddings. Inputs are not validated here (see forward)."""
        cfg = self.config
        dtype = self.patch_embed.weight.dtype
        video = x[:, :, None] if x.dim() == 4 else x
        b, c, t, h, w = video.shape
        inp = video.to(dtype)
        if cfg.image_condition:
            ff = first_frame.to(dtype)[:, :, None].expand(b, c, t, h, w)
            flag = inp.new_zeros(b, 1, t, h, w)
            flag[:, :, 0] = 1
            inp = torch.cat([inp, ff, flag], dim=1)
        tokens, grid = self._patchify(inp)
        tokens = self.patch_embed(tokens)
        if cfg.absolute_pos:
            tokens = tokens + absolute_position_embedding(grid, cfg.hidden_size, device=x.device).to(tokens.dtype)
        if self.frame_embed is not None:
            tokens = tokens + self.frame_embed[:grid[0]].repeat_interleave(grid[1] * grid[2], dim=0).to(tokens.dtype)
        return tokens, grid

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *,
                text_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                first_frame: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the velocity.

        x: (B, C, T, H, W) video or (B, C, H, W) image latents, any float dtype.
        timestep: (B,) (or () for all) float, 1000 * sigma in [0, 1000].
        text: (B, L, text_dim) token embeddings; text_mask: (B, L) bool, True = real token
        (padding is excluded from attention and from the default pooling).
        pooled: (B, text_dim) or None (then the masked mean of ``text``).
        first_frame: (B, C, H, W) when config.image_condition, else None.
        Returns the velocity with x's shape (C_out channels) and dtype; the network runs in
        its parameters' dtype (or the autocast dtype).
        """
        self._check_inputs(x, timestep, text, text_mask, pooled, first_frame)
        cfg = self.config
        dtype = self.patch_embed.weight.dtype
        b = x.shape[0]
        tokens, grid = self.embed(x, first_frame)

        text = text.to(dtype)
        if pooled is None:
            keep = (text.new_ones(text.shape[:2]) if text_mask is None else text_mask.to(dtype))[..., None]
            pooled = (text * keep).sum(1) / keep.sum(1).clamp_min(1)
        ctx = self.text_embed(text)
        timestep = timestep.to(x.device).float().expand(b)
        c_act = F.silu(self.t_embed(timestep) + self.pooled_embed(pooled.to(dtype)))
        shared = shared_text = None
        if self.shared_mod is not None:
            shared = self.shared_mod(c_act).unflatten(-1, (-1, cfg.hidden_size))
            shared, shared_text = shared[:, :MOD_ATTN_MLP], shared[:, MOD_ATTN_MLP:]
        rope = rope_freqs(grid, cfg.head_dim, cfg.rope_theta, device=x.device)
        backend = cfg.attention_backend
        shard = None
        if self._sp is not None:  # this rank's tokens and their RoPE rows (padding: identity)
            shard = self._sp.shard(tokens.shape[1])
            tokens, rope = shard.split(tokens), shard.split(rope, dim=0, fill=1)

        recompute = set(self.checkpointed_blocks()) if self.training and torch.is_grad_enabled() else set()
        for i, block in enumerate(self.blocks):
            run = block
            if i in recompute:
                def run(*args, _block=block):
                    return checkpoint(_block, *args, use_reentrant=False)
            if cfg.joint_attention:
                tokens, ctx = run(tokens, ctx, c_act, shared, shared_text, text_mask, rope, backend, shard)
            else:
                tokens = run(tokens, c_act, shared, ctx, text_mask, rope, backend, shard)
        patches = self.final(tokens, c_act)
        if shard is not None:
            patches = shard.gather(patches)
        out = self._unpatchify(patches, grid)
        return (out[:, :, 0] if x.dim() == 4 else out).to(x.dtype)

    # ------------------------------------------------------------------ files
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if
        needed), each atomically: temp file in the same directory, fsync, rename."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        text = json.dumps({"model_type": "dancegrpo-video-dit", **self.config.to_dict()}, indent=2)
        _atomic_write(directory / CONFIG_NAME, lambda p: p.write_text(text + "\n"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> VideoDiT:
        """Load what ``save_pretrained`` wrote. Tensors keep their saved dtype and go straight
        to ``map_location`` (the model is built on the meta device, no double allocation).
        Returned in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"VideoDiT.from_pretrained: {directory / name} not found")
        raw = json.loads((directory / CONFIG_NAME).read_text())
        model_type = raw.pop("model_type", None)
        if model_type != "dancegrpo-video-dit":
            raise ValueError(f"VideoDiT.from_pretrained: {directory / CONFIG_NAME} has model_type "
                             f"{model_type!r}, expected 'dancegrpo-video-dit'")
        config = DiTConfig.from_dict(raw)
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(directory / WEIGHTS_NAME), device=str(torch.device(map_location)))
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then fsync and rename over ``path``: readers see the old or the new file,
    never a partial one, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
