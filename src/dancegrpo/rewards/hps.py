"""HPS v2.1 (Human Preference Score v2.1): an open_clip ViT-H-14 fine-tuned on human preferences.

The checkpoint (``HPS_v2.1_compressed.pt``) is a state dict in open_clip's layout, usually under a
``"state_dict"`` key. It is loaded into transformers' ``CLIPModel`` (same architecture: pre-LN
transformer, GELU, class-token pooling, bias-free projections) through an explicit key mapping,
so neither open_clip nor torchvision is needed. The score is HPSv2's own: the cosine of the
L2-normalised image and text features, times ``scale`` (1 by default, as HPSv2 reports it; some
code bases use 100). Preprocessing runs on tensors, on the reward's device: HPSv2's evaluation
transform (resize the longest side to 224 with antialiased bicubic, zero-pad to a centred
square, normalise with OpenAI CLIP's mean/std). See docs/rewards_hps.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, MissingFileError

__all__ = ["HPSv2Reward", "VIT_H_14", "openclip_to_transformers", "transformers_to_openclip", "preprocess"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's ViT-H-14: embed 1024; vision width 1280, 32 layers, head width 80; text width 1024, 24 layers.
VIT_H_14 = {
    "projection_dim": 1024,
    "vision": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 16, "patch_size": 14, "image_size": 224},
    "text": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "max_position_embeddings": 77},
}

# Per residual block: open_clip name -> transformers name (attn.in_proj is split into q/k/v).
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
           "transformer.resblocks.": "text_model.encoder.layers."}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# open_clip keeps projections as (width, embed) matrices used as x @ proj; nn.Linear stores the transpose.
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def openclip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict to transformers' ``CLIPModel`` keys (unknown keys kept as is,
    so loading reports them)."""
    out = {}
    for key, value in sd.items():
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        else:
            tower = next((t for t in _TOWERS if key.startswith(t)), None)
            if tower is None:
                out[key] = value
                continue
            index, _, rest = key[len(tower):].partition(".")
            prefix = f"{_TOWERS[tower]}{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            module, _, leaf = rest.rpartition(".")
            out[prefix + _BLOCK.get(module, module) + "." + leaf] = value
    return out


def transformers_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`openclip_to_transformers` (writes checkpoints in open_clip's layout)."""
    plain = {v: k for k, v in _PLAIN.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        if key in plain:
            out[plain[key]] = value
        elif key in transposed:
            out[transposed[key]] = value.t().contiguous()
        else:
            tower = next((t for t in towers if key.startswith(t)), None)
            if tower is None:
                continue  # transformers' non-weight buffers (position_ids)
            index, _, rest = key[len(tower):].partition(".")
            prefix = f"{towers[tower]}{index}."
            module, _, leaf = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, leaf), {})[module[10]] = value
                continue
            out[prefix + block[module] + "." + leaf] = value
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{leaf}"] = torch.cat([parts[n] for n in "qkv"], dim=0)
    return out


def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform on (N, 3, H, W) pixels in [0, 1]: resize the longest side to
    ``size`` (bicubic, antialiased), zero-pad to a centred square, normalise with CLIP's mean/std."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    # HPSv2 pads only when it resized; padding always keeps non-square inputs batchable.
    ph, pw = size - images.shape[-2], size - images.shape[-1]
    if ph or pw:
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    mean = images.new_tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _merged_config(config: dict | None) -> dict:
    cfg = {"projection_dim": VIT_H_14["projection_dim"], "vision": dict(VIT_H_14["vision"]),
           "text": dict(VIT_H_14["text"])}
    for key, value in (config or {}).items():
        if key not in cfg:
            raise ConfigError(f"hps_v2 config: unknown key {key!r}; expected projection_dim, vision, text")
        if isinstance(cfg[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"hps_v2 config.{key}: expected a mapping of CLIP {key} config fields")
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise MissingFileError(f"hps_v2 path: checkpoint {path!r} not found; expected HPS_v2.1_compressed.pt "
                               "(the HPS v2.1 state dict in open_clip's layout)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"hps_v2 path: {path!r} is not a readable torch checkpoint ({type(exc).__name__})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"hps_v2 path: {path!r} holds no state dict of tensors")
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _build_model(sd: dict[str, torch.Tensor], config: dict, path: str, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None, **config["text"]}
    vision = {"hidden_act": "gelu", "layer_norm_eps": 1e-5, **config["vision"]}
    clip_cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=config["projection_dim"])
    with torch.device("meta"):  # no random init of a billion parameters that are overwritten next
        model = CLIPModel(clip_cfg)
    model.to_empty(device="cpu")
    mapped = openclip_to_transformers(sd)
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - mapped.keys()), sorted(mapped.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"hps_v2 path: {path!r} does not fit open_clip's CLIP layout for this config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    own = model.state_dict()
    for key, value in mapped.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"hps_v2 path: {path!r} key {key!r} has shape {tuple(value.shape)}, "
                                  f"the config expects {tuple(own[key].shape)}")
    model.load_state_dict(mapped, strict=False)
    for emb in (model.vision_model.embeddings, model.text_model.embeddings):  # buffers left empty by meta init
        emb.position_ids.copy_(torch.arange(emb.position_ids.shape[-1]).expand(1, -1))
    return model.eval().requires_grad_(False)


def _load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise MissingFileError(f"hps_v2 tokenizer: {folder!r} must be a folder holding CLIP's BPE tokenizer.json "
                               "or vocab.json + merges.txt (e.g. the tokenizer files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


class HPSv2Reward:
    """``reward(samples, prompts) -> (B,)``: HPS v2.1 on images (B, 3, H, W) or videos (B, 3, T, H, W)
    in [0, 1]. Videos: every frame (or ``frames`` evenly spaced ones) is scored with the video's
    prompt and the scores averaged.

    ``path``: the HPS checkpoint; ``tokenizer``: a folder with CLIP's vocab.json/merges.txt;
    ``config``: overrides of the ViT-H-14 dims (``projection_dim``, ``vision``, ``text``);
    ``dtype``: bfloat16 on CUDA and float32 elsewhere unless given; ``batch_size``: images per forward.
    """

    name = "hps_v2"

    def __init__(self, path: str, tokenizer: str, config: dict | None = None, device: str = "cpu",
                 dtype: str | None = None, batch_size: int = 32, frames: int | None = None, scale: float = 1.0):
        cfg = _merged_config(config)
        self.device = torch.device(device)
        if dtype is None:
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"hps_v2 dtype: expected float32, bfloat16 or float16, got {dtype!r}")
        if frames is not None and (not isinstance(frames, int) or frames < 1):
            raise ConfigError(f"hps_v2 frames: expected a positive integer or null, got {frames!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"hps_v2 batch_size: expected a positive integer, got {batch_size!r}")
        self.tokenizer = _load_tokenizer(tokenizer)
        self.model = _build_model(_load_state_dict(path), cfg, path, self.tokenizer).to(self.device, getattr(torch, dtype))
        self.dtype = getattr(torch, dtype)
        self.image_size = cfg["vision"]["image_size"]
        self.context_length = cfg["text"]["max_position_embeddings"]
        self.batch_size, self.frames, self.scale = batch_size, frames, float(scale)
        self.range = (-abs(self.scale), abs(self.scale))

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip's convention: [sot] text [eot], cut to the context with eot kept last, zero-padded.
        Returns the ids (N, context) and each row's eot position (the pooled token)."""
        ids = torch.zeros(len(prompts), self.context_length, dtype=torch.long)
        eot = torch.empty(len(prompts), dtype=torch.long)
        for i, row in enumerate(self.tokenizer(list(prompts), truncation=False)["input_ids"]):
            row = row[: self.context_length]
            row[-1] = self.tokenizer.eos_token_id
            ids[i, : len(row)] = torch.tensor(row)
            eot[i] = len(row) - 1
        return ids, eot

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        ids, eot = self.tokenize(prompts)
        hidden = self.model.text_model(input_ids=ids.to(self.device)).last_hidden_state
        pooled = hidden[torch.arange(len(prompts), device=self.device), eot.to(self.device)]
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.to(self.device, torch.float32), self.image_size).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.inference_mode()
    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if samples.dim() not in (4, 5) or samples.shape[1] != 3:
            raise ValueError(f"hps_v2: samples must be (B, 3, H, W) or (B, 3, T, H, W), got {tuple(samples.shape)}")
        b = samples.shape[0]
        if len(prompts) != b:
            raise ValueError(f"hps_v2: {len(prompts)} prompts for {b} samples")
        x = torch.nan_to_num(samples.detach().float(), nan=0.0).clamp(0.0, 1.0)
        if x.dim() == 5:
            t = x.shape[2]
            if self.frames is not None and self.frames < t:
                x = x[:, :, torch.linspace(0, t - 1, self.frames).round().long()]
            t = x.shape[2]
            x = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, *x.shape[-2:])
        else:
            t = 1
        unique = list(dict.fromkeys(prompts))  # groups share prompts: encode each once
        text = self.text_features(unique)[[unique.index(p) for p in prompts]]
        text = text.repeat_interleave(t, dim=0)
        scores = torch.cat([
            (self.image_features(x[i:i + self.batch_size]) * text[i:i + self.batch_size]).sum(-1)
            for i in range(0, x.shape[0], self.batch_size)
        ])
        return (self.scale * scores.view(b, t).mean(dim=1)).to(samples.device, torch.float32)
