"""The reward service's wire format: a JSON header and raw array bytes in one HTTP body.

A message is ``len(header)`` (4 bytes, little-endian unsigned), the UTF-8 JSON header, then
the array's bytes in C order, little-endian. Requests carry samples
(``{"shape": [B, 3, (T,) H, W], "dtype": "uint8" | "float32", "prompts": [...]}``); answers
carry float32 scores (``{"count": B, "reward": name, "errors": [...]}``), NaN where the reward
failed on a sample. No image codec: uint8 pixels are what learned rewards' processors read,
float32 keeps the exact pixels (scores then equal in-process scoring bit for bit).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

__all__ = ["CONTENT_TYPE", "DTYPES", "WireError", "to_wire", "from_wire", "pack", "unpack",
           "encode_samples", "decode_samples", "encode_scores", "decode_scores"]

CONTENT_TYPE = "application/x-dancegrpo-array"
DTYPES = {"uint8": np.uint8, "float32": np.dtype("<f4")}
_MAX_HEADER = 1 << 24


class WireError(ValueError):
    """A message that does not follow the format (says what is wrong with it)."""


def to_wire(samples: torch.Tensor, dtype: str) -> np.ndarray:
    """Pixels in [0, 1] as sent: uint8 ``round(255 x)`` (x clamped, non-finite -> 0) or float32."""
    x = samples.detach().to("cpu", torch.float32)
    if dtype == "uint8":
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
        return (x * 255).round().to(torch.uint8).numpy()
    if dtype == "float32":
        return x.contiguous().numpy()
    raise WireError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")


def from_wire(array: np.ndarray) -> torch.Tensor:
    """What the reward sees: float32 pixels (uint8 / 255)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.float().div_(255) if t.dtype == torch.uint8 else t.float()


def pack(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + payload


def unpack(body: bytes) -> tuple[dict, bytes]:
    if len(body) < 4:
        raise WireError(f"message of {len(body)} bytes is shorter than its 4-byte header length")
    (n,) = struct.unpack("<I", body[:4])
    if n > _MAX_HEADER or 4 + n > len(body):
        raise WireError(f"header length {n} does not fit in a message of {len(body)} bytes")
    try:
        header = json.loads(body[4:4 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a JSON object, got {type(header).__name__}")
    return header, body[4 + n:]


def encode_samples(samples: torch.Tensor, prompts, dtype: str = "uint8") -> bytes:
    a = to_wire(samples, dtype)
    return pack({"shape": list(a.shape), "dtype": dtype, "prompts": list(prompts)}, a.tobytes())


def decode_samples(body: bytes) -> tuple[torch.Tensor, list[str]]:
    header, payload = unpack(body)
    shape, dtype, prompts = header.get("shape"), header.get("dtype"), header.get("prompts")
    if dtype not in DTYPES:
        raise WireError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) not in (4, 5) or shape[1] != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise WireError(f"shape must be [B, 3, H, W] or [B, 3, T, H, W] of positive integers, got {shape!r}")
    if not isinstance(prompts, list) or len(prompts) != shape[0] or not all(isinstance(p, str) for p in prompts):
        raise WireError(f"prompts must be a list of {shape[0]} strings")
    dt = np.dtype(DTYPES[dtype])
    need = int(np.prod(shape)) * dt.itemsize
    if len(payload) != need:
        raise WireError(f"body holds {len(payload)} bytes, shape {shape} of {dtype} needs {need}")
    return from_wire(np.frombuffer(payload, dtype=dt).reshape(shape)), prompts


def encode_scores(scores: torch.Tensor, reward: str, errors: list[str]) -> bytes:
    s = scores.detach().to("cpu", torch.float32).reshape(-1).numpy().astype("<f4")
    return pack({"count": int(s.size), "reward": reward, "errors": list(errors)}, s.tobytes())


def decode_scores(body: bytes, batch: int) -> tuple[torch.Tensor, dict]:
    header, payload = unpack(body)
    if header.get("count") != batch or len(payload) != 4 * batch:
        raise WireError(f"expected {batch} float32 scores, got count {header.get('count')!r} and "
                        f"{len(payload)} bytes")
    return torch.from_numpy(np.frombuffer(payload, dtype="<f4").copy()), header
