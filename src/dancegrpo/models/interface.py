"""The model interface the trainer and samplers use; every model family implements it.

The shapes world's video DiT (``dancegrpo.worlds.shapes.policy``) and the toy model
implement it; another model family (a flow model predicting velocity, or a diffusion model
predicting noise with classifier-free guidance inside ``predict``) plugs in by implementing
the same four methods, so the trainer never branches on the model.

Conditioning is a ``dict[str, Tensor]`` whose tensors all have the batch first, so the
trainer can store, index (``{k: v[idx]}``) and move it without knowing what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch

Conditioning = dict[str, torch.Tensor]


def select(cond: Conditioning, index) -> Conditioning:
    """The samples ``index`` (an int tensor, slice or list) of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


def concat(conds: Sequence[Conditioning]) -> Conditioning:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def repeat(cond: Conditioning, times: int) -> Conditioning:
    """Each sample repeated ``times`` in a row (a prompt's group stays contiguous)."""
    return {k: v.repeat_interleave(times, dim=0) for k, v in cond.items()}


@runtime_checkable
class GenerativeModel(Protocol):
    """What a trainable generator exposes.

    prediction: ``"velocity"`` (rectified flow: the sampler's ``v``) or ``"epsilon"``
    (diffusion: the noise prediction DDIM uses).
    """

    prediction: Literal["velocity", "epsilon"]

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, e.g. (C, H, W) or (C, T, H, W)."""

    def encode_prompts(self, prompts: Sequence[str], images: torch.Tensor | None = None) -> Conditioning:
        """Text (and, for image-to-video, first-frame) conditioning, batch first.

        images: (B, 3, H, W) in [0, 1] for image-to-video, else None.
        """

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The model output for ``latents`` (B, *latent_shape) at ``timesteps`` (B,) in the
        model's own units (1000 * sigma for flow models, the DDPM step for diffusion), with any
        classifier-free guidance applied inside. Same shape as ``latents``."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1]: (B, 3, H, W) for images or (B, 3, T, H, W) for videos."""
