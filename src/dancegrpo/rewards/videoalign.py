"""VideoAlign / VideoReward (``videoalign``): Qwen2-VL with a reward head read at three special tokens.

The original (KwaiVGI/VideoAlign, ``inference.py`` and ``trainer.py``) is Qwen2-VL-2B-Instruct
with ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>`` added to the tokenizer (the
embeddings resized to the new vocabulary), LoRA on the language model's linear layers, and
``rm_head = Linear(hidden, output_dim, bias=False)`` applied to the last hidden states; the
scores are the head's outputs at the three special tokens, which the ``detailed_special``
prompt places after the visual-quality, motion-quality and text-alignment paragraphs.
``use_norm`` maps each to ``(x - mean) / std`` with ``inference_config``'s constants, and
``Overall = VQ + MQ + TA``.

What is read from disk, as the original lays it out (``path`` = the VideoReward folder):

* ``model_config.json``: ``data_config`` (fps or num_frames, max_frame_pixels, eval_dim,
  prompt_template_type), ``model_config`` (output_dim, use_special_tokens, reward_token),
  ``peft_lora_config`` (lora_r, lora_alpha, use_rslora), ``inference_config`` (means, stds);
* ``checkpoint-<step>/``: ``model.pth`` (the whole PEFT-wrapped state dict) or
  ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``; the newest step unless
  ``checkpoint_step`` is given (the original's rule);
* ``base_path``: the Qwen2-VL-2B-Instruct folder (``model_config.model_name_or_path``):
  weights, tokenizer, chat template, preprocessor_config.json.

LoRA is merged into the base weights at load (``W + s * B @ A``, ``s = alpha / r``), so no peft
at inference. Checkpoint keys of transformers < 4.52 (``visual.*``, ``model.layers.*``) and of
newer ones (``model.visual.*``, ``model.language_model.*``) both load.

Frames (on tensors, on the reward's device), as ``vision_process.fetch_video`` + the Qwen2-VL
processor do: ``nframes`` evenly spaced indices ``linspace(0, T - 1, nframes).round()``, with
``nframes = T / video_fps * fps`` clamped to [4, T] and rounded to even (or ``num_frames``);
each frame at uint8 levels resized to ``smart_resize(H, W, 28, 128*28*28, max_frame_pixels)``
(bicubic, antialiased, rounded to uint8 as torchvision does on uint8 video); ``/ 255``,
normalised with the processor's mean and std, cut into 2 x 14 x 14 patches in Qwen2-VL's order.
Images are refused: the original scores videos of at least 2 frames.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, MissingDependencyError, MissingFileError
from .clip import resolve_dtype, resolve_reward_device

__all__ = ["VideoAlignReward", "DIMENSIONS", "SPECIAL_TOKENS", "build_prompt", "smart_resize", "sample_count",
           "frame_indices", "patchify", "merge_checkpoint"]

DIMENSIONS = ("VQ", "MQ", "TA", "Overall")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200

# The original's ``detailed_special`` template (prompt_template.py), word for word: the model
# was trained on it.
DETAILED_SPECIAL = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**\x20\x20
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible.\x20

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**\x20\x20
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**\x20\x20
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.\x20\x20
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def build_prompt(prompt: str, template_type: str = "detailed_special") -> str:
    """The text part of the user message (only the template the released model uses)."""
    if template_type != "detailed_special":
        raise ConfigError(f"videoalign: data_config.prompt_template_type={template_type!r} is not supported; the "
                          f"released VideoReward uses 'detailed_special'")
    return DETAILED_SPECIAL.format(text_prompt=prompt)


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = VIDEO_MIN_PIXELS,
                 max_pixels: int = 768 * 28 * 28) -> tuple[int, int]:
    """qwen-vl-utils' size rule: sides multiples of ``factor``, area in [min, max], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"videoalign: aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def sample_count(total: int, *, fps: float | None, video_fps: float | None, num_frames: int | None) -> int:
    """qwen-vl-utils' ``smart_nframes`` for a clip of ``total`` frames."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(total / video_fps * fps, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"videoalign: a video of {total} frames gives {n} sampled frames; at least "
                         f"{FRAME_FACTOR} are needed")
    return n


def frame_indices(total: int, n: int) -> torch.Tensor:
    return torch.linspace(0, total - 1, n).round().long()


def patchify(video: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) normalised frames -> (grid_t * grid_h * grid_w, C * temporal * patch^2) in the
    Qwen2-VL processors' order (time, merged rows, merged cols, in-merge row, col; then channel,
    time-in-patch, pixel row, col), the last frame repeated to a multiple of ``temporal``."""
    if pad := -video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = video.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = video.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def _current_name(key: str) -> str:
    """A checkpoint key (PEFT-wrapped, any transformers layout) -> Qwen2VLForConditionalGeneration's
    current name (``model.visual.*``, ``model.language_model.*``, ``lm_head``) or ``rm_head.*``."""
    key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


def merge_checkpoint(state: dict, scale: float) -> tuple[dict, int]:
    """Current-layout weights from a PEFT-wrapped state dict, each LoRA pair merged into its
    base weight (``state`` holds the base weight, or it comes from the base model later: then
    the update is returned as ``name + '.lora_delta'``). Returns (weights, number of LoRA pairs)."""
    out, pairs = {}, {}
    for key, value in state.items():
        m = _LORA.match(key)
        if m:
            pairs.setdefault(_current_name(m["module"]) + ".weight", {})[m["part"]] = value
        else:
            out[_current_name(key)] = value
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"videoalign: the checkpoint has lora_{''.join(ab)} but not both for {name}")
        delta = scale * (ab["B"].float() @ ab["A"].float())
        if name in out:
            out[name] = (out[name].float() + delta).to(out[name].dtype)
        else:
            out[name + ".lora_delta"] = delta
    return out, len(pairs)


def _read_json(file: Path, what: str) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {file} is not readable JSON: {exc}") from None


def _checkpoint_dir(folder: Path, step, what: str) -> Path:
    steps = sorted((int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit())
    if not steps:
        raise MissingFileError(f"{what}: no {folder}/checkpoint-<step> folder; expected VideoReward's checkpoint "
                               f"(checkpoint-<step>/model.pth or adapter_model.safetensors + non_lora_state_dict.pth)")
    if step is None:
        return steps[-1][1]
    found = dict(steps).get(int(step)) if isinstance(step, int) else None
    if found is None:
        raise MissingFileError(f"{what}: {folder}/checkpoint-{step} not found; have steps {[s for s, _ in steps]}")
    return found


def _load_state(ckpt: Path, what: str) -> dict:
    full = ckpt / "model.pth"
    if full.is_file():
        return torch.load(full, map_location="cpu", weights_only=True)
    adapter, rest = ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    for f in (adapter, rest):
        if not f.is_file():
            raise MissingFileError(f"{what}: {f} not found; expected {full.name}, or {adapter.name} with {rest.name}")
    from safetensors.torch import load_file

    return {**torch.load(rest, map_location="cpu", weights_only=True), **load_file(str(adapter))}


def _chat_template(tokenizer, base: Path, what: str) -> str:
    """The processor's template first (the original renders with ``processor.apply_chat_template``),
    then the tokenizer's."""
    if (base / "chat_template.json").is_file():
        return _read_json(base / "chat_template.json", what)["chat_template"]
    if (base / "chat_template.jinja").is_file():
        return (base / "chat_template.jinja").read_text()
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise MissingFileError(f"{what}: {base}/chat_template.json not found; expected Qwen2-VL's chat template")


class VideoAlignReward:
    """VideoReward's VQ / MQ / TA scores, or their sum (``dimension: Overall``).

    ``path``: the VideoReward folder (model_config.json + checkpoint-<step>/); ``base_path``:
    the Qwen2-VL-2B-Instruct folder. ``video_fps``: the frame rate of the scored videos (the
    original samples ``fps`` frames per second of them, 2 by default); ``num_frames`` samples a
    fixed count instead; ``max_pixels`` caps each frame's area (default the config's
    ``max_frame_pixels``). ``use_norm`` applies inference_config's means and stds, as the
    original's default. bf16 (``dtype``) is what the original runs in.
    """

    name = "videoalign"
    range = (-math.inf, math.inf)

    def __init__(self, path=None, *, base_path=None, dimension: str = "Overall", video_fps=None, fps=None,
                 num_frames=None, max_pixels=None, use_norm: bool = True, checkpoint_step=None, device="auto",
                 dtype="float32", batch_size: int = 2):
        what = self.name
        try:
            from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
        except ImportError as exc:
            raise MissingDependencyError(f"{what} needs transformers: pip install 'dancegrpo[diffusers]' ({exc})") from None
        if dimension not in DIMENSIONS:
            raise ConfigError(f"{what}: dimension must be one of {', '.join(DIMENSIONS)}, got {dimension!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"{what}: batch_size must be a positive int, got {batch_size!r}")
        for key, value in (("path", path), ("base_path", base_path)):
            if not isinstance(value, (str, Path)) or not str(value):
                raise ConfigError(f"{what}: kwargs.{key} must be a local folder, got {value!r}")
        folder, base = Path(path).expanduser(), Path(base_path).expanduser()
        if not (folder / "model_config.json").is_file():
            raise MissingFileError(f"{what}: {folder / 'model_config.json'} not found; expected the VideoReward folder")
        if not (base / "config.json").is_file():
            raise MissingFileError(f"{what}: {base / 'config.json'} not found; expected the Qwen2-VL-2B-Instruct folder")
        if not (base / "preprocessor_config.json").is_file():
            raise MissingFileError(f"{what}: {base / 'preprocessor_config.json'} not found; expected Qwen2-VL's processor")
        cfg = _read_json(folder / "model_config.json", what)
        data, mcfg = cfg.get("data_config", {}), cfg.get("model_config", {})
        lora, norm = cfg.get("peft_lora_config", {}), cfg.get("inference_config")
        if not mcfg.get("use_special_tokens") or mcfg.get("reward_token", "special") != "special":
            raise ConfigError(f"{what}: {folder}/model_config.json does not read the reward at special tokens "
                              f"(use_special_tokens/reward_token); only that VideoReward variant is supported")
        self.output_dim = int(mcfg.get("output_dim", 1))
        if self.output_dim not in (1, 3):
            raise ConfigError(f"{what}: model_config.output_dim must be 1 or 3, got {self.output_dim}")
        self.template = data.get("prompt_template_type", "detailed_special")
        build_prompt("", self.template)
        self.num_frames = num_frames if num_frames is not None else data.get("num_frames")
        self.fps = float(fps if fps is not None else data.get("fps") or 2.0)
        if self.num_frames is None and (not isinstance(video_fps, (int, float)) or not video_fps > 0):
            raise ConfigError(f"{what}: kwargs.video_fps (the frame rate of the generated videos) is needed: VideoReward "
                              f"samples {self.fps:g} frames per second of video; or set kwargs.num_frames")
        self.video_fps = video_fps
        self.max_pixels = int(max_pixels if max_pixels is not None else data.get("max_frame_pixels", 448 * 448))
        self.dimension, self.use_norm = dimension, bool(use_norm)
        self.norm = None if (not use_norm or norm is None) else {k: (float(norm[f"{k}_mean"]), float(norm[f"{k}_std"]))
                                                                 for k in ("VQ", "MQ", "TA")}
        self.device = resolve_reward_device(device, what)
        self.dtype = resolve_dtype(dtype, what)
        self.batch_size = batch_size
        ckpt = _checkpoint_dir(folder, checkpoint_step, what)
        state = _load_state(ckpt, what)

        tok_dir = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else base
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, padding_side="right")
        self.tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        self.special_ids = self.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        self.chat_template = _chat_template(self.tokenizer, base, what)
        proc = _read_json(base / "preprocessor_config.json", what)
        self.patch = int(proc.get("patch_size", 14))
        self.temporal = int(proc.get("temporal_patch_size", 2))
        self.merge = int(proc.get("merge_size", 2))
        self.mean = [float(v) for v in proc.get("image_mean", (0.48145466, 0.4578275, 0.40821073))]
        self.std = [float(v) for v in proc.get("image_std", (0.26862954, 0.26130258, 0.27577711))]

        model = Qwen2VLForConditionalGeneration.from_pretrained(base, local_files_only=True, dtype=torch.float32)
        model.resize_token_embeddings(len(self.tokenizer))
        r, alpha = int(lora.get("lora_r", 16)), float(lora.get("lora_alpha", 32))
        scale = alpha / math.sqrt(r) if lora.get("use_rslora") else alpha / r
        weights, self.lora_pairs = merge_checkpoint(state, scale)
        head = weights.pop("rm_head.weight", None)
        if head is None:
            raise ConfigError(f"{what}: {ckpt} has no rm_head.weight; expected VideoReward's reward head")
        own = model.state_dict()
        unknown = [k for k in weights if k.removesuffix(".lora_delta") not in own]
        if unknown:
            raise ConfigError(f"{what}: {ckpt} has keys that do not fit Qwen2-VL from {base}: "
                              f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}")
        with torch.no_grad():
            for key, value in weights.items():
                if key.startswith("lm_head."):
                    continue  # the reward never reads the language-model head
                target = own[key.removesuffix(".lora_delta")]
                if target.shape != value.shape:
                    raise ConfigError(f"{what}: {ckpt}: {key} has shape {tuple(value.shape)}, Qwen2-VL from {base} has "
                                      f"{tuple(target.shape)}")
                if key.endswith(".lora_delta"):
                    target.add_(value.to(target.dtype))
                else:
                    target.copy_(value)
        self.model = model.model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.rm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
        self.rm_head.weight.data.copy_(head)
        self.rm_head.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.rm_head.out_features != self.output_dim:
            raise ConfigError(f"{what}: rm_head has {self.rm_head.out_features} outputs, model_config.output_dim says "
                              f"{self.output_dim}")
        self.video_token_id = int(model.config.video_token_id)
        self._mm_types = "mm_token_type_ids" in inspect.signature(self.model.forward).parameters
        self.pad_id = self.tokenizer.pad_token_id

    # --- inputs ------------------------------------------------------------------------------

    def video_pixels(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(3, T, H, W) in [0, 1] -> (patches, grid_thw), on the reward's device."""
        t, (h, w) = video.shape[1], video.shape[-2:]
        n = sample_count(t, fps=self.fps, video_fps=self.video_fps, num_frames=self.num_frames)
        x = video.to(self.device).index_select(1, frame_indices(t, n).to(self.device)).transpose(0, 1).float()
        x = (x.clamp(0, 1) * 255).round()  # the original decodes uint8 video
        rh, rw = smart_resize(h, w, IMAGE_FACTOR, VIDEO_MIN_PIXELS, self.max_pixels)
        if (rh, rw) != (h, w):  # torchvision's resize of uint8 tensors: one antialiased pass, clamp, round
            x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255).round()
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return patchify((x / 255 - m) / s, self.patch, self.temporal, self.merge)

    def text(self, prompt: str, tokens: int) -> str:
        chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": build_prompt(prompt, self.template)}]}]
        text = self.tokenizer.apply_chat_template(chat, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        if text.count("<|video_pad|>") != 1:
            raise ConfigError(f"{self.name}: the chat template does not place one <|video_pad|> for the video")
        return text.replace("<|video_pad|>", "<|video_pad|>" * tokens)

    def token_types(self, input_ids: torch.Tensor) -> dict:
        """transformers >= 5 wants the modality of each token for M-RoPE (2 = video), which its
        processor returns; older versions derive it from the ids."""
        if not self._mm_types:
            return {}
        return {"mm_token_type_ids": (input_ids == self.video_token_id).int() * 2}

    @torch.inference_mode()
    def raw_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 3) VQ, MQ, TA before normalisation, float32."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            pix, grids, texts = [], [], []
            for video, prompt in zip(videos[i:i + self.batch_size], prompts[i:i + self.batch_size], strict=True):
                p, grid = self.video_pixels(video)
                pix.append(p)
                grids.append(grid)
                texts.append(self.text(prompt, p.shape[0] // self.merge ** 2))
            tok = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                pixel_values_videos=torch.cat(pix).to(self.dtype),
                                video_grid_thw=torch.tensor(grids, device=self.device),
                                **self.token_types(tok["input_ids"])).last_hidden_state
            logits = self.rm_head(hidden)
            mask = torch.isin(tok["input_ids"], torch.tensor(self.special_ids, device=self.device))
            if (mask.sum(1) != 3).any():
                raise ValueError(f"{self.name}: each prompt must hold the three reward tokens once (truncated?)")
            pooled = logits[mask].view(len(texts), 3, -1)
            out.append((pooled.diagonal(dim1=1, dim2=2) if self.output_dim == 3 else pooled[..., 0]).float())
        return torch.cat(out)

    def scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        raw = self.raw_scores(videos, prompts)
        got = {}
        for j, k in enumerate(("VQ", "MQ", "TA")):
            got[k] = raw[:, j] if self.norm is None else (raw[:, j] - self.norm[k][0]) / self.norm[k][1]
        got["Overall"] = got["VQ"] + got["MQ"] + got["TA"]
        return got

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"{self.name}: samples must be a torch.Tensor, got {type(samples).__name__}")
        if samples.dim() != 5 or samples.shape[1] != 3:
            raise ValueError(f"{self.name}: samples must be videos (B, 3, T, H, W) with T >= 2, got "
                             f"{tuple(samples.shape)}; VideoReward does not score images")
        if isinstance(prompts, str) or len(prompts) != samples.shape[0]:
            raise ValueError(f"{self.name}: prompts must be a list of {samples.shape[0]} str")
        x = torch.nan_to_num(samples.detach().float(), nan=0.5, posinf=1.0, neginf=0.0)
        return self.scores(x, list(prompts))[self.dimension].float().to(samples.device)

    def __repr__(self) -> str:
        return f"VideoAlignReward(dimension={self.dimension!r}, device={self.device}, dtype={self.dtype})"
