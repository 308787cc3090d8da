"""One attention entry point for the models, with xformers-style backend dispatch.

    out[b, s, h] = sum_l softmax_l(scale * <q[b, s, h], k[b, l, h]> over valid l) v[b, l, h]

``attention(q, k, v, key_padding_mask=None, backend="auto")`` with q (B, S, H, D) and k, v
(B, L, H, D), the layout flash-attn and xformers use (no transposes on their path). A key
padding mask (B, L) bool, True = real token, removes padded keys from every softmax.

Backends, in ``PRIORITY`` order (data, not code):

* ``flash``: FA3 (``flash_attn_interface``, Hopper) when present, else FA2 (``flash_attn``,
  sm80+). With a padding mask it packs the valid keys and calls the variable-length kernel
  with ``cu_seqlens_k`` built from the mask, so padded text costs nothing and needs no mask.
* ``xformers``: ``memory_efficient_attention``; with a padding mask the same packing and a
  ``BlockDiagonalMask`` (a dense additive bias would cost B*H*S*L memory).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (any device, any float dtype);
  the only one that runs on CPU, and the one tests compare with a plain softmax.

Each backend declares what it supports and answers ``not_supported_reasons(q, k, v, mask)``;
``"auto"`` takes the first backend with no reasons, an explicit backend that cannot run
raises with its reasons, and ``auto`` raises with everyone's reasons if none fits.
``DANCEGRPO_ATTENTION_BACKEND`` replaces ``"auto"`` by a name. flash-attn and xformers are
imported on first use, only if ``importlib.util.find_spec`` finds them.

A sample whose keys are all padding gets a zero output on every backend (the softmax of an
empty set is undefined; SDPA would give NaN): its first key is let through so the kernels run,
and its output is zeroed afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch
import torch.nn.functional as F

__all__ = ["attention", "available_backends", "availability", "get_backend", "select_backend",
           "AttentionBackend", "PRIORITY", "BACKEND_NAMES"]

PRIORITY = ("flash", "xformers", "sdpa")
BACKEND_NAMES = ("auto", *PRIORITY)
_ENV = "DANCEGRPO_ATTENTION_BACKEND"


class AttentionBackend:
    """What an attention backend declares; subclasses implement ``run``.

    devices: device types it runs on (None: any). dtypes: q/k/v dtypes. max_head_dim and
    head_dim_multiple: limits of the kernel's head dimension.
    """

    name = "?"
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = ()
    max_head_dim: int | None = None
    head_dim_multiple: int = 1

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all here (not installed, fails to import)."""
        return []

    def device_reasons(self, device: torch.device) -> list[str]:
        """Why it cannot run on ``device`` (wrong device type, GPU too old)."""
        if self.devices is not None and device.type not in self.devices:
            return [f"device {device.type!r} not in {self.devices}"]
        return []

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              key_padding_mask: torch.Tensor | None = None) -> list[str]:
        reasons = self.unavailable_reasons() + self.device_reasons(q.device)
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {[str(d).replace('torch.', '') for d in self.dtypes]}")
        d = q.shape[-1]
        if self.max_head_dim is not None and d > self.max_head_dim:
            reasons.append(f"head dim {d} > {self.max_head_dim}")
        if d % self.head_dim_multiple:
            reasons.append(f"head dim {d} not a multiple of {self.head_dim_multiple}")
        return reasons

    def run(self, q, k, v, key_padding_mask, scale):  # pragma: no cover - abstract
        raise NotImplementedError


class _Importable:
    """A lazily imported optional module: find_spec first (no import), then one real import
    whose ImportError (a broken build: missing CUDA symbols) becomes a reason, not a crash."""

    def __init__(self, name: str):
        self.name = name
        self._module = None
        self._error: str | None = None

    def present(self) -> bool:
        return importlib.util.find_spec(self.name) is not None

    def load(self):
        """The module, or None with ``self.error`` set."""
        if self._module is None and self._error is None:
            if not self.present():
                self._error = f"{self.name} is not installed"
            else:
                try:
                    self._module = importlib.import_module(self.name)
                except ImportError as exc:  # installed but unusable: say why, let others run
                    self._error = f"{self.name} failed to import: {exc}"
        return self._module

    @property
    def error(self) -> str | None:
        self.load()
        return self._error


def _pack_keys(k, v, mask):
    """Valid keys of every sample concatenated: (total, H, D) each, their per-sample counts
    (B,) int32 and cumulative offsets (B + 1,) int32 (flash-attn's cu_seqlens)."""
    lens = mask.sum(1, dtype=torch.int32)
    cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    return k[mask], v[mask], lens, cu


class FlashBackend(AttentionBackend):
    name = "flash"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    max_head_dim = 256
    head_dim_multiple = 8

    def __init__(self):
        self.fa3 = _Importable("flash_attn_interface")
        self.fa2 = _Importable("flash_attn")

    def unavailable_reasons(self):
        if not self.fa3.present() and not self.fa2.present():
            return ["neither flash_attn_interface (FA3) nor flash_attn (FA2) is installed"]
        return []

    def _pick(self, device: torch.device):
        """FA3 on Hopper (sm90) when it imports, else FA2 on sm80+; None when neither fits."""
        major, _ = torch.cuda.get_device_capability(device)
        if major == 9 and self.fa3.present() and self.fa3.load() is not None:
            return self.fa3.load()
        if major >= 8 and self.fa2.present() and self.fa2.load() is not None:
            return self.fa2.load()
        return None

    def device_reasons(self, device):
        # Only here, on a CUDA device, is flash-attn imported (never on a CPU-only run).
        reasons = super().device_reasons(device)
        if reasons or self.unavailable_reasons() or self._pick(device) is not None:
            return reasons
        errors = [m.error for m in (self.fa3, self.fa2) if m.present() and m.error]
        cap = torch.cuda.get_device_capability(device)
        return errors or [f"compute capability {cap}: FA3 needs sm90, FA2 needs sm80 or newer"]

    def run(self, q, k, v, key_padding_mask, scale):
        fa = self._pick(q.device)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        if key_padding_mask is None:
            out = fa.flash_attn_func(q, k, v, softmax_scale=scale)
        else:
            b, s, h, d = q.shape
            kp, vp, lens, cu_k = _pack_keys(k, v, key_padding_mask)
            cu_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
            out = fa.flash_attn_varlen_func(q.reshape(b * s, h, d), kp, vp, cu_q, cu_k, s,
                                            int(lens.max()), softmax_scale=scale)
            if isinstance(out, tuple):  # some FA3 releases return (out, lse)
                out = out[0]
            return out.view(b, s, h, d)
        return out[0] if isinstance(out, tuple) else out


class XformersBackend(AttentionBackend):
    name = "xformers"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def __init__(self):
        self.ops = _Importable("xformers.ops")

    def unavailable_reasons(self):
        if importlib.util.find_spec("xformers") is None:
            return ["xformers is not installed"]
        return []

    def device_reasons(self, device):
        # Imported only once a CUDA device asks for it.
        reasons = super().device_reasons(device)
        if not reasons and not self.unavailable_reasons() and self.ops.error:
            reasons.append(self.ops.error)
        return reasons

    def run(self, q, k, v, key_padding_mask, scale):
        xops = self.ops.load()
        if key_padding_mask is None:
            return xops.memory_efficient_attention(q, k, v, scale=scale)
        b, s, h, d = q.shape
        kp, vp, lens, _ = _pack_keys(k, v, key_padding_mask)
        bias_mod = importlib.import_module("xformers.ops.fmha.attn_bias")
        bias = bias_mod.BlockDiagonalMask.from_seqlens([s] * b, lens.tolist())
        out = xops.memory_efficient_attention(q.reshape(1, b * s, h, d), kp[None], vp[None],
                                              attn_bias=bias, scale=scale)
        return out.view(b, s, h, d)


class SDPABackend(AttentionBackend):
    name = "sdpa"
    devices = None
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def run(self, q, k, v, key_padding_mask, scale):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
        return out.transpose(1, 2)


_BACKENDS: dict[str, AttentionBackend] = {}
_FACTORIES = {"flash": FlashBackend, "xformers": XformersBackend, "sdpa": SDPABackend}


def get_backend(name: str) -> AttentionBackend:
    """The backend object called ``name`` (one of ``PRIORITY``)."""
    if name not in _FACTORIES:
        raise ValueError(f"attention backend must be one of {list(BACKEND_NAMES)}, got {name!r}")
    if name not in _BACKENDS:
        _BACKENDS[name] = _FACTORIES[name]()
    return _BACKENDS[name]


def _check(q, k, v, key_padding_mask, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"attention: {name} must be floating point, got {t.dtype}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"attention: k and v must be (B, L, H, D) = ({b}, L, {h}, {d}) like q, got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("attention: key_padding_mask must be a bool tensor (True = real token), got "
                            f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if key_padding_mask.shape != (b, k.shape[1]):
            raise ValueError(f"attention: key_padding_mask must have shape (B, L) = ({b}, {k.shape[1]}), "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask on {key_padding_mask.device}, q on {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"attention: scale must be a positive float or None, got {scale!r}")


def select_backend(q, k, v, key_padding_mask=None, backend: str = "auto") -> AttentionBackend:
    """The backend that will run these inputs: explicit (raises if it cannot) or auto."""
    if not isinstance(backend, str):
        raise TypeError(f"attention: backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(_ENV, "") or "auto"
    if backend != "auto":
        chosen = get_backend(backend)
        reasons = chosen.not_supported_reasons(q, k, v, key_padding_mask)
        if reasons:
            raise RuntimeError(f"attention backend {backend!r} cannot run these inputs: " + "; ".join(reasons))
        return chosen
    tried = []
    for name in PRIORITY:
        candidate = get_backend(name)
        reasons = candidate.not_supported_reasons(q, k, v, key_padding_mask)
        if not reasons:
            return candidate
        tried.append(f"{name}: " + "; ".join(reasons))
    raise RuntimeError("no attention backend can run these inputs "
                       f"(q {tuple(q.shape)} {q.dtype} on {q.device}):\n  " + "\n  ".join(tried))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None, backend: str = "auto", *,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head attention, no causal mask, through the chosen backend.

    q: (B, S, H, D); k, v: (B, L, H, D); one float dtype (fp16/bf16 for flash, fp32 too for
    xformers and sdpa, fp64 for sdpa). key_padding_mask: (B, L) bool, True = attend. scale:
    default 1 / sqrt(D). Returns (B, S, H, D) in q.dtype (possibly non-contiguous), differentiable
    in q, k, v. A sample with no valid key gets zeros.

    Equivalent PyTorch::

        s = torch.einsum("bshd,blhd->bhsl", q, k) * scale
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        out = torch.einsum("bhsl,blhd->bshd", s.softmax(-1), v)
    """
    _check(q, k, v, key_padding_mask, scale)
    impl = select_backend(q, k, v, key_padding_mask, backend)
    if k.shape[1] == 0:  # no keys at all (an empty prompt): the same zeros as all-padding
        return torch.zeros_like(q)
    empty = None
    if key_padding_mask is not None:
        # Let the first key of an all-padding sample through so every kernel has a non-empty
        # softmax, then zero that sample's output: same result on every backend, no host sync.
        empty = ~key_padding_mask.any(1)
        key_padding_mask = key_padding_mask.clone()
        key_padding_mask[:, 0] |= empty
    out = impl.run(q, k, v, key_padding_mask, scale)
    if empty is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def available_backends(device: str | torch.device | None = None) -> dict[str, list[str]]:
    """Backend name -> reasons it cannot run on ``device`` (empty list: available).

    device: default "cuda" when CUDA is available, else "cpu". Dtype and head-dim limits are
    per call and not listed here. Never raises; imports flash-attn/xformers if installed.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    out = {}
    for name in PRIORITY:
        b = get_backend(name)
        reasons = b.unavailable_reasons()
        if device.type != "cuda" or torch.cuda.is_available():
            reasons = reasons + b.device_reasons(device)
        else:
            reasons = reasons + ["CUDA is not available"]
        out[name] = reasons
    return out


# The name ops/dispatch.py uses for the same report (``python -m dancegrpo.env`` calls it).
availability = available_backends
