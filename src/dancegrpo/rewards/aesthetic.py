"""The LAION aesthetic predictor v2 (``aesthetic``): a linear MLP on CLIP ViT-L/14 image embeddings.

The checkpoint (``sac+logos+ava1-l14-linearMSE.pth``, from christophschuhmann/
improved-aesthetic-predictor) is the state dict of an ``nn.Sequential`` named ``layers``:

    0 Linear(768, 1024)  1 Dropout(0.2)  2 Linear(1024, 128)  3 Dropout(0.2)
    4 Linear(128, 64)    5 Dropout(0.1)  6 Linear(64, 16)     7 Linear(16, 1)

with no activations (the "linear" in its name). The score is that MLP applied to the CLIP
image embedding (the projected one, 768-d for ViT-L/14) divided by its L2 norm: about 1 to 10,
the AVA rating scale. :class:`AestheticPredictor` builds exactly this layout, so the original
file loads with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MissingFileError
from .clip import ClipBackbone, frames_of

__all__ = ["AestheticPredictor", "AestheticReward", "load_mlp_state_dict"]

HIDDEN = (1024, 128, 64, 16)
DROPOUT = (0.2, 0.2, 0.1)


class AestheticPredictor(nn.Module):
    """The MLP, in the checkpoint's layout (dropout is inactive in eval mode)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        a, b, c, d = HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(input_size, a), nn.Dropout(DROPOUT[0]),
            nn.Linear(a, b), nn.Dropout(DROPOUT[1]),
            nn.Linear(b, c), nn.Dropout(DROPOUT[2]),
            nn.Linear(c, d),
            nn.Linear(d, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def load_mlp_state_dict(path, what: str = "aesthetic") -> dict[str, torch.Tensor]:
    """The MLP's state dict from a ``.pth`` (torch.save, loaded with weights_only) or a
    ``.safetensors`` file."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{what}: kwargs.path must be the MLP's state dict file "
                          f"(e.g. sac+logos+ava1-l14-linearMSE.pth), got {path!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingFileError(f"{what}: {file} not found; expected the aesthetic MLP's state dict "
                               f"(e.g. sac+logos+ava1-l14-linearMSE.pth, or a .safetensors of it)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise ConfigError(f"{what}: {file} is not a readable state dict: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: {file} holds a {type(state).__name__}, expected a state dict")
    return state


class AestheticReward:
    """LAION aesthetic predictor v2: ``MLP(e / ||e||)``, e the CLIP ViT-L/14 image embedding.

    ``path``: the MLP's state dict (sac+logos+ava1-l14-linearMSE.pth or a .safetensors with
    the same keys); ``clip_path``: the openai/clip-vit-large-patch14 CLIPModel folder (with
    its preprocessor_config.json). ``prompts`` is not used (it may be None). Videos: the mean
    over ``num_frames`` evenly spaced frames (first and last included).
    """

    name = "aesthetic"
    range = (-math.inf, math.inf)

    def __init__(self, path=None, *, clip_path=None, device="auto", dtype="float32", batch_size: int = 32,
                 num_frames: int = 8):
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ConfigError(f"{self.name}: num_frames must be a positive int, got {num_frames!r}")
        self.num_frames = num_frames
        state = load_mlp_state_dict(path, self.name)
        self.clip = ClipBackbone(clip_path, device=device, dtype=dtype, batch_size=batch_size, what=self.name,
                                 key="clip_path")
        dim = int(self.clip.model.config.projection_dim)
        self.mlp = AestheticPredictor(dim)
        try:
            self.mlp.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()
            raise ConfigError(f"{self.name}: {path} does not fit the aesthetic MLP on {dim}-d CLIP embeddings "
                              f"({' '.join(s.strip() for s in first[:3])})") from None
        self.mlp.to(self.clip.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def embeddings_score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N,) scores of (N, D) CLIP image embeddings (normalised here), float32."""
        return self.mlp(F.normalize(embeddings.float(), dim=-1))[:, 0]

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        frames, _, n = frames_of(samples, prompts, self.num_frames, self.name, need_prompts=False)
        score = self.embeddings_score(self.clip.image_features(frames)).reshape(-1, n).mean(1)
        return score.float().to(samples.device)

    def __repr__(self) -> str:
        return f"AestheticReward(name={self.name!r}, device={self.clip.device}, dtype={self.clip.dtype})"
