"""CLIP-family rewards through transformers' CLIP classes: ``clip_score`` and ``pickscore``.

Shared pieces, also used by :mod:`dancegrpo.rewards.aesthetic`:

* :func:`preprocess` - CLIPImageProcessor's transform (resize the shortest side, bicubic;
  centre crop; normalise) on tensors, on their device, with no PIL round trip.
* :class:`ClipBackbone` - a ``CLIPModel``, its tokenizer and its image-processor settings
  loaded from local folders (``from_pretrained(path, local_files_only=True)``: a missing file
  is a one-line :class:`~dancegrpo.errors.MissingFileError`, never a download).
* :func:`frames_of` - the frames a reward scores: every image, or ``num_frames`` evenly
  spaced frames of each video (first and last included), whose scores are averaged.

Formulas (docs/rewards.md has the sources): ``clip_score`` is torchmetrics' CLIPScore,
``max(100 cos(img, txt), 0)``; ``pickscore`` is PickScore's model card,
``exp(logit_scale) cos(img, txt)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingDependencyError, MissingFileError

__all__ = ["preprocess", "frames_of", "ClipBackbone", "ClipScore", "PickScore"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_BICUBIC = 3  # PIL.Image.BICUBIC, the resample CLIP's processor configs name


def resolve_dtype(dtype, what: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"{what}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def resolve_reward_device(device, what: str) -> torch.device:
    """``auto`` (default): CUDA when there is one, else the CPU; any device the machine has."""
    from ..trainer.policy import resolve_device

    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"{what}: device must be a string such as 'cuda:1', 'cpu' or 'auto', got {device!r}")
    return resolve_device(str(device))


def _size(value, key: str, what: str, fields: tuple[str, ...]):
    """Fields of a processor's ``size``/``crop_size``: an int, a dict or a SizeDict."""
    if isinstance(value, int):
        return (value,) * len(fields)
    get = value.get if isinstance(value, dict) else lambda k: getattr(value, k, None)
    got = tuple(get(f) for f in fields)
    if any(v is None for v in got):
        raise ConfigError(f"{what}: image processor {key}={value!r} has no {'/'.join(fields)}; CLIP's has")
    return tuple(int(v) for v in got)


def preprocess(images: torch.Tensor, *, shortest_edge: int, crop: tuple[int, int], mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """CLIPImageProcessor's transform on (N, 3, H, W) pixels in [0, 1], on their device.

    The shortest side goes to ``shortest_edge`` and the other to ``int(shortest_edge * long /
    short)`` (the processor truncates), bicubic with antialiasing: torch's antialiased bicubic
    is PIL's filter (a = -0.5, widened when shrinking), applied as PIL does, width then
    height, clamped to [0, 1] after each pass, so the only difference from the PIL processor
    is that PIL rounds to uint8 after each pass (at most about 1.1 uint8 steps, mean 0.3).
    The crop takes the processor's offsets ``(H - h) // 2``, then ``(x - mean) / std``.
    Returns float32.
    """
    x = images.float()
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    size = (new_short, new_long) if h <= w else (new_long, new_short)
    # Two passes, width then height, clamped after each: PIL's order, and its uint8 passes
    # cannot hold the bicubic overshoot beyond [0, 1] between them.
    if size[1] != w:
        x = F.interpolate(x, size=(h, size[1]), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if size[0] != h:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    ch, cw = crop
    h, w = x.shape[-2:]
    if ch > h or cw > w:  # the processor pads here; no CLIP config asks for a crop above its resize
        raise ValueError(f"crop {crop} is larger than the resized image {(h, w)}")
    top, left = (h - ch) // 2, (w - cw) // 2
    x = x[..., top:top + ch, left:left + cw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def frames_of(samples, prompts, num_frames: int, what: str, *, need_prompts: bool = True):
    """Validate; return frames (B*F, 3, H, W) in [0, 1] (non-finite pixels replaced, others
    clamped), prompts repeated per frame (or None), and F. Videos give ``num_frames`` evenly
    spaced frames (all of them when they have fewer)."""
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{what}: samples must be a torch.Tensor, got {type(samples).__name__}")
    if samples.dim() not in (4, 5) or samples.shape[1] != 3:
        raise ValueError(f"{what}: samples must be (B, 3, H, W) or (B, 3, T, H, W), got {tuple(samples.shape)}")
    b = samples.shape[0]
    if b == 0:
        raise ValueError(f"{what}: samples is an empty batch")
    if need_prompts or prompts is not None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"{what}: prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) != b:
            raise ValueError(f"{what}: prompts has {len(prompts)} entries but samples has batch {b}")
    x = samples.detach()
    if x.dim() == 5:
        t = x.shape[2]
        n = min(num_frames, t)
        index = torch.linspace(0, t - 1, n).round().long().to(x.device)
        x = x.index_select(2, index).transpose(1, 2).reshape(b * n, 3, *x.shape[-2:])
    else:
        n = 1
    x = torch.nan_to_num(x.float(), nan=0.5, posinf=1.0, neginf=0.0).clamp(0, 1)
    texts = None if prompts is None else [p for p in prompts for _ in range(n)]
    return x, texts, n


def _check_folder(path, key: str, what: str, files: Sequence[str], expected: str) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{what}: kwargs.{key} must be a local folder ({expected}), got {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"{what}: kwargs.{key}={str(path)!r} is not a folder; expected {expected}")
    if not any((folder / f).is_file() for f in files):
        raise MissingFileError(f"{what}: {folder / files[0]} not found; expected {expected}")
    return folder


class ClipBackbone:
    """A transformers ``CLIPModel`` with its tokenizer and image-processor settings.

    ``path``: a folder written by ``save_pretrained`` (config.json + model.safetensors or
    pytorch_model.bin); ``processor_path``: the folder with the tokenizer and
    preprocessor_config.json (default ``path``). The model runs on ``device`` in ``dtype``,
    in inference mode, ``batch_size`` images or prompts at a time; features come back float32.
    """

    def __init__(self, path, *, processor_path=None, device="auto", dtype="float32", batch_size: int = 32,
                 what: str = "clip", key: str = "path"):
        try:
            import transformers
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as exc:
            raise MissingDependencyError(f"{what} needs transformers: pip install 'dancegrpo[diffusers]' ({exc})") from None
        # transformers 5 names the PIL processor CLIPImageProcessorPil (CLIPImageProcessor then
        # means the torchvision one when it is installed); only its settings are read here.
        image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{what}: batch_size must be a positive int, got {batch_size!r}")
        folder = _check_folder(path, key, what, ("config.json",), "a CLIPModel folder written by save_pretrained")
        _check_folder(path, key, what, _WEIGHTS, "the CLIPModel weights (model.safetensors or pytorch_model.bin)")
        proc_key = key if processor_path is None else "processor_path"
        proc = _check_folder(folder if processor_path is None else processor_path, proc_key, what,
                             ("preprocessor_config.json",), "CLIP's image processor and tokenizer files")
        _check_folder(proc, proc_key, what, ("tokenizer.json", "vocab.json"), "CLIP's tokenizer files")
        self.device = resolve_reward_device(device, what)
        self.dtype = resolve_dtype(dtype, what)
        self.batch_size = batch_size
        try:
            self.model = CLIPModel.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(proc, local_files_only=True)
            processor = image_processor.from_pretrained(proc, local_files_only=True)
        except OSError as exc:  # a file from_pretrained wants and the folder lacks
            raise MissingFileError(f"{what}: cannot load the CLIP model from {folder}: {str(exc).splitlines()[0]}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        flags = {k: getattr(processor, k, True) for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")}
        if not all(flags.values()) or int(processor.resample) != _BICUBIC \
                or abs(float(processor.rescale_factor) - 1 / 255) > 1e-9:
            raise ConfigError(f"{what}: {proc}/preprocessor_config.json is not CLIP's transform (bicubic resize, centre "
                              f"crop, rescale by 1/255, normalise); got {flags}, resample={processor.resample}, "
                              f"rescale_factor={processor.rescale_factor}")
        (self.shortest_edge,) = _size(processor.size, "size", what, ("shortest_edge",))
        self.crop = _size(processor.crop_size, "crop_size", what, ("height", "width"))
        self.mean, self.std = list(processor.image_mean), list(processor.image_std)
        cfg = self.model.config.text_config
        self.max_length = min(int(self.tokenizer.model_max_length), int(cfg.max_position_embeddings))

    def pixels(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the model's pixel_values, on the reward's device."""
        x = frames.to(self.device)
        return preprocess(x, shortest_edge=self.shortest_edge, crop=self.crop, mean=self.mean, std=self.std)

    @torch.inference_mode()
    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (N, D) float32 (not normalised)."""
        out = []
        for chunk in frames.split(self.batch_size):
            pixel_values = self.pixels(chunk).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=pixel_values).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return torch.cat(out)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (N, D) float32 (not normalised); prompts truncated to the
        model's context (77 tokens for CLIP)."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tok = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float())
        return torch.cat(out)

    def cosine(self, frames: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(N,) cosine of each frame's and its prompt's normalised features, float32."""
        img = F.normalize(self.image_features(frames), dim=-1)
        unique = list(dict.fromkeys(texts))  # a video's frames share their prompt: encode it once
        txt = F.normalize(self.text_features(unique), dim=-1)
        rows = torch.tensor([unique.index(t) for t in texts], device=txt.device)
        return (img * txt[rows]).sum(-1)


class _ClipReward:
    name = "clip"
    range = (-math.inf, math.inf)

    def _check_frames(self, num_frames) -> int:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ConfigError(f"{self.name}: num_frames must be a positive int, got {num_frames!r}")
        return num_frames

    def _per_frame(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        frames, texts, n = frames_of(samples, prompts, self.num_frames, self.name)
        score = self._per_frame(self.clip.cosine(frames, texts)).reshape(-1, n).mean(1)
        return score.float().to(samples.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.clip.device}, dtype={self.clip.dtype})"


class ClipScore(_ClipReward):
    """CLIP score ``max(100 * cos(E_img, E_txt), 0)`` with CLIP ViT-L/14 (torchmetrics'
    CLIPScore convention; ``scale=2.5`` gives Hessel et al.'s CLIP-S instead). Range [0, 100].

    ``path``: a CLIPModel folder (e.g. openai/clip-vit-large-patch14 downloaded with its
    tokenizer and preprocessor_config.json). Videos: the mean over ``num_frames`` evenly
    spaced frames (first and last included).
    """

    name = "clip_score"

    def __init__(self, path=None, *, processor_path=None, scale: float = 100.0, device="auto", dtype="float32",
                 batch_size: int = 32, num_frames: int = 8):
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"clip_score: scale must be a positive number, got {scale!r}")
        self.scale = float(scale)
        self.range = (0.0, self.scale)
        self.num_frames = self._check_frames(num_frames)
        self.clip = ClipBackbone(path, processor_path=processor_path, device=device, dtype=dtype,
                                 batch_size=batch_size, what=self.name)

    def _per_frame(self, cos):
        return (self.scale * cos).clamp(min=0)


class PickScore(_ClipReward):
    """PickScore: ``exp(logit_scale) * cos(E_img, E_txt)`` with the PickScore_v1 CLIP-H model,
    as its model card computes it (``logit_scale`` read from the checkpoint).

    ``path``: the yuvalkirstain/PickScore_v1 folder; ``processor_path``: the folder with the
    processor it was trained with (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), default ``path``.
    Videos: the mean over ``num_frames`` evenly spaced frames.
    """

    name = "pickscore"

    def __init__(self, path=None, *, processor_path=None, device="auto", dtype="float32", batch_size: int = 32,
                 num_frames: int = 8):
        self.num_frames = self._check_frames(num_frames)
        self.clip = ClipBackbone(path, processor_path=processor_path, device=device, dtype=dtype,
                                 batch_size=batch_size, what=self.name)
        self.logit_scale = float(self.clip.model.logit_scale.float().exp())

    def _per_frame(self, cos):
        return self.logit_scale * cos
