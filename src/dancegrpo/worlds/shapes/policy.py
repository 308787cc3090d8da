"""The shapes world's generator: our VideoDiT plus the world's tiny text encoder, as a
``GenerativeModel`` (see ``dancegrpo/models/interface.py``).

Latents are pixels scaled to [-1, 1] (the world is small enough to need no VAE), so ``decode``
is a rescale. The shipped base models live in ``dancegrpo/assets/shapes_<task>/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...models.config import DiTConfig
from ...models.dit import VideoDiT
from ...models.interface import Conditioning
from .text import TextEncoder, Tokenizer

TASKS = ("t2i", "t2v", "i2v")
ASSETS = Path(__file__).resolve().parents[2] / "assets"

# Architecture of the shipped base models (small enough to train and run on a laptop CPU).
# Video uses one frame per token: with two, a 96-wide token would have to carry 96 pixel
# values, and the model starts far from the image model it is inflated from (pretrain.py).
# The shipped video models also carry a learned frame embedding (from that inflation).
DEFAULT_DIT = {
    "t2i": dict(patch_size=(1, 4, 4), hidden_size=96, depth=4, num_heads=4, absolute_pos=True),
    "t2v": dict(patch_size=(1, 4, 4), hidden_size=96, depth=4, num_heads=4, absolute_pos=True),
    "i2v": dict(patch_size=(1, 4, 4), hidden_size=96, depth=4, num_heads=4, absolute_pos=True, image_condition=True),
}


class ShapesPolicy(nn.Module):
    """Text (and first frame) -> velocity on [-1, 1] pixel latents of the shapes world.

    task: "t2i" (latents (3, size, size)), "t2v" / "i2v" (latents (3, frames, size, size);
    i2v also takes the first frame).

    pin_first_frame (i2v; default on): the clip's first frame *is* the given one, so its
    velocity is known exactly, ``(x - frame) / sigma`` (rectified flow: x = (1 - sigma) frame +
    sigma noise), and replaces the network's guess for frame 0. Sampling then lands frame 0 on
    the given frame at every step's precision, and the network only learns the frames after it
    (which attend to an exact frame 0 all along the trajectory).
    """

    prediction = "velocity"

    def __init__(self, task: str = "t2i", *, size: int = 32, frames: int = 8, text_dim: int = 64,
                 text_layers: int = 2, dit: dict | None = None, pin_first_frame: bool | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        pin = task == "i2v" if pin_first_frame is None else bool(pin_first_frame)
        if pin and task != "i2v":
            raise ValueError(f"pin_first_frame needs task 'i2v' (a given first frame), got task {task!r}")
        self.pin_first_frame = pin
        self.task, self.size, self.frames = task, int(size), int(frames)
        self.tokenizer = Tokenizer()
        self.text_encoder = TextEncoder(dim=text_dim, layers=text_layers)
        cfg = dict(DEFAULT_DIT[task])
        cfg.update(dit or {})
        cfg["text_dim"] = text_dim
        self.dit = VideoDiT(DiTConfig(**cfg))
        self._init_args = dict(task=task, size=self.size, frames=self.frames, text_dim=text_dim,
                               text_layers=text_layers, dit={k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in cfg.items() if k != "text_dim"})
        if task == "i2v":
            self._init_args["pin_first_frame"] = pin

    @property
    def video(self) -> bool:
        return self.task != "t2i"

    def latent_shape(self) -> tuple[int, ...]:
        return (3, self.frames, self.size, self.size) if self.video else (3, self.size, self.size)

    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> Conditioning:
        """Conditioning for ``prompts``; ``images`` (B, 3, size, size) in [0, 1] for i2v."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        device = next(self.parameters()).device
        ids, mask = self.tokenizer.encode(list(prompts))
        tokens, mask, pooled = self.text_encoder(ids.to(device), mask.to(device))
        cond = {"text": tokens, "mask": mask, "pooled": pooled}
        if self.task == "i2v":
            if images is None:
                raise ValueError("task 'i2v' needs images: the first frames (B, 3, H, W) in [0, 1]")
            if images.shape != (len(prompts), 3, self.size, self.size):
                raise ValueError(f"images must have shape ({len(prompts)}, 3, {self.size}, {self.size}), "
                                 f"got {tuple(images.shape)}")
            cond["first_frame"] = images.to(device, torch.float32) * 2 - 1
        elif images is not None:
            raise ValueError(f"task {self.task!r} takes no images")
        return cond

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        v = self.dit(latents, timesteps, cond["text"], text_mask=cond["mask"], pooled=cond["pooled"],
                     first_frame=cond.get("first_frame"))
        if not self.pin_first_frame:
            return v
        # Timesteps are 1000 sigma (the flow samplers' convention); the floor only guards a
        # caller asking at sigma = 0, where x already is the frame.
        sigma = (torch.as_tensor(timesteps, device=v.device).float().reshape(-1) / 1000).clamp(min=1e-3)
        sigma = sigma.expand(latents.shape[0]).view(-1, 1, 1, 1)
        exact = (latents[:, :, 0].float() - cond["first_frame"].float()) / sigma
        return torch.cat([exact.to(v.dtype)[:, :, None], v[:, :, 1:]], dim=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    # -- persistence -------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors, each written to a temp file, fsynced and renamed.
        ``state_dict``: weights to write instead of the module's own (e.g. an EMA copy)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or self.state_dict()).items()}
        tmp = d / "model.safetensors.tmp"
        save_file(state, str(tmp))
        _fsync_rename(tmp, d / "model.safetensors")
        tmp = d / "config.json.tmp"
        tmp.write_text(json.dumps(self._init_args, indent=2))
        _fsync_rename(tmp, d / "config.json")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location="cpu") -> ShapesPolicy:
        d = Path(directory)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"{d} is not a ShapesPolicy folder (needs config.json and model.safetensors)")
        args = json.loads((d / "config.json").read_text())
        if "dit" in args and "patch_size" in args["dit"]:
            args["dit"]["patch_size"] = tuple(args["dit"]["patch_size"])
        model = cls(**args)
        state = load_file(str(d / "model.safetensors"), device=str(map_location))
        model.load_state_dict(state)
        return model


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def base_model_path(task: str) -> Path:
    return ASSETS / f"shapes_{task}"


def build_policy(task: str = "t2i", pretrained: bool | str = True, **overrides) -> ShapesPolicy:
    """The shapes generator for ``task``: the shipped base model (``pretrained=True``), a
    random-init one (``False``) or one loaded from a folder (a path)."""
    if pretrained is False:
        return ShapesPolicy(task, **overrides)
    path = base_model_path(task) if pretrained is True else Path(pretrained)
    model = ShapesPolicy.from_pretrained(path)
    if model.task != task:
        raise ValueError(f"{path} holds a {model.task!r} model, but task={task!r} was asked for")
    if overrides:
        raise ValueError(f"overrides {sorted(overrides)} only apply to a random-init model (pretrained=False)")
    return model
