"""ImageReward (``image_reward``): a BLIP image-text encoder and an MLP head, built from
transformers' BLIP classes and loaded from the original ``ImageReward.pt``.

The original model (THUDM/ImageReward, ``ImageReward/ImageReward.py``) is

* ``blip.visual_encoder``: BLIP's ViT-L/16 at 224 (timm layout: ``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``; LayerNorm eps 1e-6, exact GELU) - the layout of transformers' ``BlipVisionModel``
  under other names;
* ``blip.text_encoder``: BLIP's BERT with cross-attention to the image tokens (``med.py``,
  configured by ``med_config.json``) - transformers' ``BlipTextModel`` with the same key
  names, run bidirectionally (``is_decoder=False``);
* ``mlp.layers``: the same activation-free MLP as the LAION aesthetic predictor, on 768-d text
  features (:class:`~dancegrpo.rewards.aesthetic.AestheticPredictor`).

Score: ``(mlp(text_encoder(ids, image_embeds).last_hidden_state[:, 0]) - MEAN) / STD``, the
prompt tokenised by bert-base-uncased with ``[DEC]`` and ``[ENC]`` added, padded and truncated
to 35 tokens. Pixels: resize the shortest side to 224 (bicubic), centre-crop 224 with
torchvision's rounded offsets, normalise with CLIP's mean and std.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError, MissingDependencyError, MissingFileError
from .aesthetic import AestheticPredictor
from .clip import frames_of, preprocess, resolve_dtype, resolve_reward_device

__all__ = ["ImageRewardModel", "ImageReward", "convert_state_dict", "IMAGE_SIZE", "MAX_LENGTH", "MEAN", "STD"]

IMAGE_SIZE = 224
MAX_LENGTH = 35
MEAN = 0.16717362830052426  # the original's normalisation of the MLP output
STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
log = logging.getLogger("dancegrpo.rewards")
HEAD_DIM = 64  # BLIP's ViT-B and ViT-L both use 64-d heads (12 x 64, 16 x 64)

_VISION_RENAMES = [  # timm VisionTransformer -> BlipVisionModel
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# Keys of the original that the score does not use (BLIP's contrastive projections, buffers).
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def convert_state_dict(state: dict) -> tuple[dict, dict, dict, list[str]]:
    """Split the original state dict into (vision, text, mlp) state dicts under transformers'
    names; also return the keys that fit none of them (and are not known to be unused)."""
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_RENAMES:
                new, n = re.subn(pattern, repl, name)
                if n:
                    vision[new] = value
                    break
            else:
                unknown.append(key)
        elif _UNUSED.search(key):
            continue
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        else:
            unknown.append(key)
    return vision, text, mlp, unknown


def _load_med_config(file: Path, what: str) -> dict:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {file} is not a readable JSON BERT config: {exc}") from None
    need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise ConfigError(f"{what}: {file} lacks {', '.join(missing)}; expected BLIP's med_config.json")
    return cfg


class ImageRewardModel(torch.nn.Module):
    """BlipVisionModel + BlipTextModel (with cross-attention) + the MLP head."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticPredictor(text_config.hidden_size)

    def features(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        """The text encoder's first-token state, cross-attending to the image tokens (N, D)."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds, is_decoder=False)
        return out.last_hidden_state[:, 0]

    def score(self, input_ids, attention_mask, pixel_values) -> torch.Tensor:
        """(N,) ImageReward scores, float32 (the MLP runs in float32, as the original's)."""
        feats = self.features(input_ids, attention_mask, pixel_values).float()
        return ((self.mlp(feats) - MEAN) / STD)[:, 0]


def _configs(vision: dict, med: dict, what: str):
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
        positions = vision["embeddings.position_embedding"].shape[1]
    except (KeyError, ValueError):
        raise ConfigError(f"{what}: the checkpoint has no blip.visual_encoder.patch_embed.proj.weight/pos_embed "
                          f"of BLIP's ViT") from None
    depth = 1 + max((int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")), default=-1)
    grid = math.isqrt(positions - 1)
    if grid * patch != IMAGE_SIZE or width % HEAD_DIM:
        raise ConfigError(f"{what}: the checkpoint's ViT ({grid}x{grid} patches of {patch}, width {width}) is not "
                          f"BLIP's ViT at {IMAGE_SIZE} with {HEAD_DIM}-d heads")
    vcfg = BlipVisionConfig(hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=depth, num_attention_heads=width // HEAD_DIM, image_size=IMAGE_SIZE,
                            patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
    tcfg = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med.get("max_position_embeddings", 512),
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation only
        is_decoder=True)  # builds the cross-attention layers; forward runs with is_decoder=False
    return vcfg, tcfg


def load_model(file: Path, med_file: Path, what: str = "image_reward") -> ImageRewardModel:
    """The model from the original ``ImageReward.pt`` state dict and ``med_config.json``."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise ConfigError(f"{what}: {file} is not a readable state dict: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"{what}: {file} holds a {type(state).__name__}, expected ImageReward's state dict")
    vision, text, mlp, unknown = convert_state_dict(state)
    if unknown:  # the original loads with strict=False; what the score needs is checked below
        log.warning("%s: %s has %d keys the score does not use (ignored): %s%s", what, file, len(unknown),
                    ", ".join(unknown[:3]), " ..." if len(unknown) > 3 else "")
    vcfg, tcfg = _configs(vision, _load_med_config(med_file, what), what)
    model = ImageRewardModel(vcfg, tcfg)
    for part, sd, prefix in ((model.visual_encoder, vision, "blip.visual_encoder"),
                             (model.text_encoder, text, "blip.text_encoder"), (model.mlp, mlp, "mlp")):
        try:
            part.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            lines = " ".join(s.strip() for s in str(exc).splitlines()[:3])
            raise ConfigError(f"{what}: {file} does not fit ImageReward's {prefix} ({lines[:300]})") from None
    return model


def _tokenizer(path, what: str):
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{what}: kwargs.tokenizer_path must be a bert-base-uncased tokenizer folder, got {path!r}")
    folder = Path(path).expanduser()
    if not (folder / "vocab.txt").is_file() and not (folder / "tokenizer.json").is_file():
        raise MissingFileError(f"{what}: {folder / 'vocab.txt'} not found; expected bert-base-uncased's tokenizer "
                               f"files (vocab.txt or tokenizer.json)")
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(folder, local_files_only=True)
    # The original's init_tokenizer: [DEC] as bos, [ENC] as an extra special token (ids 30522, 30523).
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def pixels(frames: torch.Tensor) -> torch.Tensor:
    """The original's torchvision transform on (N, 3, H, W) in [0, 1]: Resize(224, bicubic),
    CenterCrop(224) (offsets ``round((H - 224) / 2)``), Normalize(CLIP mean, std)."""
    h, w = frames.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if h <= w else (new_long, IMAGE_SIZE)
    x = preprocess(frames, shortest_edge=IMAGE_SIZE, crop=size, mean=CLIP_MEAN, std=CLIP_STD)  # resize + normalise
    top, left = int(round((size[0] - IMAGE_SIZE) / 2.0)), int(round((size[1] - IMAGE_SIZE) / 2.0))
    return x[..., top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]


class ImageReward:
    """ImageReward v1.0 without its package.

    ``path``: ``ImageReward.pt`` or the folder holding it (THUDM/ImageReward on the hub, with
    ``med_config.json`` beside it); ``med_config``: that JSON file when it lives elsewhere;
    ``tokenizer_path``: a bert-base-uncased tokenizer folder. Runs on ``device`` in ``dtype``
    (the BLIP encoders; the MLP stays float32), in inference mode, ``batch_size`` frames at a
    time. Videos: the mean over ``num_frames`` evenly spaced frames (first and last included).
    """

    name = "image_reward"
    range = (-math.inf, math.inf)

    def __init__(self, path=None, *, med_config=None, tokenizer_path=None, device="auto", dtype="float32",
                 batch_size: int = 32, num_frames: int = 8):
        what = self.name
        try:
            import transformers  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(f"{what} needs transformers: pip install 'dancegrpo[diffusers]' ({exc})") from None
        for key, value in (("batch_size", batch_size), ("num_frames", num_frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{what}: {key} must be a positive int, got {value!r}")
        if not isinstance(path, (str, Path)) or not str(path):
            raise ConfigError(f"{what}: kwargs.path must be ImageReward.pt or the folder holding it, got {path!r}")
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "ImageReward.pt"
        if not file.is_file():
            raise MissingFileError(f"{what}: {file} not found; expected ImageReward's checkpoint (ImageReward.pt)")
        med = Path(med_config).expanduser() if med_config is not None else file.parent / "med_config.json"
        if not med.is_file():
            raise MissingFileError(f"{what}: {med} not found; expected BLIP's med_config.json (kwargs.med_config)")
        self.tokenizer = _tokenizer(tokenizer_path, what)
        self.device = resolve_reward_device(device, what)
        self.dtype = resolve_dtype(dtype, what)
        self.batch_size, self.num_frames = batch_size, num_frames
        model = load_model(file, med, what)
        model.visual_encoder.to(self.dtype)
        model.text_encoder.to(self.dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @torch.inference_mode()
    def scores(self, frames: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(N,) float32 scores of frames (N, 3, H, W) in [0, 1] and their prompts."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[i:i + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=MAX_LENGTH, return_tensors="pt").to(self.device)
            x = pixels(frames[i:i + self.batch_size].to(self.device)).to(self.dtype)
            out.append(self.model.score(tok["input_ids"], tok["attention_mask"], x))
        return torch.cat(out)

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        frames, texts, n = frames_of(samples, prompts, self.num_frames, self.name)
        return self.scores(frames, texts).reshape(-1, n).mean(1).float().to(samples.device)

    def __repr__(self) -> str:
        return f"ImageReward(name={self.name!r}, device={self.device}, dtype={self.dtype})"
