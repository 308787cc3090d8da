"""``vlm_judge``: a vision-language model as the judge, through any OpenAI-compatible chat endpoint.

    rewards: [{name: vlm_judge, kwargs: {url: "http://127.0.0.1:8000/v1", model: Qwen2.5-VL-7B-Instruct,
                                         template: "... {prompt} ... Answer with a score from 1 to 10.",
                                         score_range: [1, 10]}}]

For each sample, one ``POST {url}/chat/completions`` carries the template (``{prompt}`` filled
in) and the image, or ``frames`` evenly spaced frames of a video, as PNG data URLs built in
memory (the chat API takes no raw arrays). The score is the first number in the answer
(``pattern`` overrides that), mapped to [0, 1] by ``score_range`` when given. vLLM serving a
Qwen-VL or UnifiedReward model, or any hosted OpenAI-compatible API (``api_key_env`` names the
variable holding its key), answers this.

An answer with no number, or one outside ``score_range``, makes that sample NaN (dropped by the
advantage step) and is logged with the answer, so a template that confuses the judge shows at
once. An endpoint that cannot be reached (after ``retries``) fails the batch with the cause, as
``remote`` does. ``temperature`` defaults to 0, so the judge is as repeatable as the server is.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from .remote import RemoteRewardError, post_with_retries

__all__ = ["VLMJudgeReward"]

log = logging.getLogger("dancegrpo.rewards.vlm_judge")

DEFAULT_TEMPLATE = ("Rate how well this image matches the description and how good it looks. "
                    "Description: \"{prompt}\". Answer with one number from 1 (worst) to 10 (best).")
_NUMBER = r"-?\d+(?:\.\d+)?"


def _png_data_url(image: torch.Tensor) -> str:
    """(3, H, W) in [0, 1] -> ``data:image/png;base64,...`` (8-bit, encoded in memory)."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class VLMJudgeReward:
    def __init__(self, url: str, model: str, template: str = DEFAULT_TEMPLATE, score_range=None,
                 pattern: str = _NUMBER, frames: int = 4, timeout: float = 120.0, retries: int = 2,
                 max_tokens: int = 32, temperature: float = 0.0, concurrency: int = 8,
                 api_key_env: str | None = None, backoff: float = 0.5):
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"vlm_judge: url must look like http://HOST:PORT/v1, got {url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"vlm_judge: model must be the served model's name, got {model!r}")
        if not isinstance(template, str) or "{prompt}" not in template:
            raise ValueError("vlm_judge: template must be a string containing {prompt}")
        try:
            self.pattern = re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"vlm_judge: pattern {pattern!r} is not a regular expression: {exc}") from None
        if score_range is not None:
            ok = (isinstance(score_range, (list, tuple)) and len(score_range) == 2
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in score_range)
                  and score_range[0] < score_range[1])
            if not ok:
                raise ValueError(f"vlm_judge: score_range must be [low, high] with low < high, got {score_range!r}")
        for key, value, low in (("frames", frames, 1), ("retries", retries, 0), ("max_tokens", max_tokens, 1),
                                ("concurrency", concurrency, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"vlm_judge: {key} must be an integer >= {low}, got {value!r}")
        for key, value in (("timeout", timeout), ("temperature", temperature), ("backoff", backoff)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"vlm_judge: {key} must be a number >= 0, got {value!r}")
        self.api_key = None
        if api_key_env is not None:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ValueError(f"vlm_judge: api_key_env={api_key_env!r} but that environment variable is empty")
        self.url, self.model, self.template = url.rstrip("/"), model, template
        self.score_range = None if score_range is None else (float(score_range[0]), float(score_range[1]))
        self.frames, self.timeout, self.retries = frames, float(timeout), retries
        self.max_tokens, self.temperature, self.concurrency, self.backoff = max_tokens, float(temperature), concurrency, float(backoff)
        self.name = "vlm_judge"

    def __repr__(self) -> str:
        return f"VLMJudgeReward(url={self.url!r}, model={self.model!r})"

    def _images(self, sample: torch.Tensor) -> list[torch.Tensor]:
        if sample.dim() == 3:
            return [sample]
        t = sample.shape[1]  # (3, T, H, W): evenly spaced frames, first and last included
        index = torch.linspace(0, t - 1, min(self.frames, t)).round().long().tolist()
        return [sample[:, i] for i in index]

    def _body(self, sample: torch.Tensor, prompt: str) -> bytes:
        content = [{"type": "text", "text": self.template.format(prompt=prompt)}]
        content += [{"type": "image_url", "image_url": {"url": _png_data_url(im)}} for im in self._images(sample)]
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.url}/chat/completions", data=body, method="POST", headers=headers)
        answer = post_with_retries(request, retries=self.retries, backoff=self.backoff, timeout=self.timeout,
                                   what="vlm_judge: ")
        try:
            return json.loads(answer)
        except json.JSONDecodeError as exc:
            raise RemoteRewardError(f"{self.url}/chat/completions answered something that is not JSON: {exc}") from None

    def parse(self, answer: str) -> float:
        """The score in ``answer`` (NaN when there is none or it is out of ``score_range``)."""
        match = self.pattern.search(answer)
        if match is None:
            return math.nan
        value = float(match.group(1) if match.groups() else match.group(0))
        if self.score_range is None:
            return value
        low, high = self.score_range
        return (value - low) / (high - low) if low <= value <= high else math.nan

    def _score_one(self, i: int, sample: torch.Tensor, prompt: str) -> float:
        reply = self._post(self._body(sample, prompt))
        try:
            answer = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            log.warning("vlm_judge: sample %d: the reply has no choices[0].message.content: %.200s", i, reply)
            return math.nan
        if isinstance(answer, list):  # some servers answer with content parts
            answer = " ".join(part.get("text", "") for part in answer if isinstance(part, dict))
        score = self.parse(str(answer))
        if math.isnan(score):
            log.warning("vlm_judge: sample %d: no score in the answer (pattern %r, range %s): %.200r",
                        i, self.pattern.pattern, self.score_range, answer)
        return score

    def __call__(self, samples: torch.Tensor, prompts) -> torch.Tensor:
        if not isinstance(samples, torch.Tensor) or samples.dim() not in (4, 5) or samples.shape[1] != 3:
            raise ValueError(f"vlm_judge: samples must be (B, 3, H, W) or (B, 3, T, H, W), got "
                             f"{getattr(samples, 'shape', type(samples).__name__)}")
        prompts = list(prompts)
        if len(prompts) != samples.shape[0]:
            raise ValueError(f"vlm_judge: {samples.shape[0]} samples but {len(prompts)} prompts")
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            scores = list(pool.map(self._score_one, range(len(prompts)), samples, prompts))
        return torch.tensor(scores, dtype=torch.float32)
