"""Per-sample coefficients of one sampler step, written as an affine Gaussian.

Every sampler DanceGRPO and its peers train with takes the form (docs/math.md)

    mean = a * x + b * v,        y = mean + std * eps,

with one ``(a, b, std)`` per sample. The builders below turn a sampler's scalars (sigmas, or
alpha-bars) into ``StepCoeffs`` so one log-prob kernel serves all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops.validate import all_true

__all__ = ["StepCoeffs", "flow_sde_coeffs", "ddim_coeffs", "flow_schedule"]

_VARIANTS = ("dance", "flow_grpo", "cps")
_LOGPROBS = ("gaussian", "mse")  # = ops.reference.LOGPROBS (kept here so importing coeffs stays light)


def _as_f64(value, name: str) -> torch.Tensor:
    """Scalar math runs in float64 (cheap, shape (B,)); results are stored as fp32."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D (B,) tensor, got shape {tuple(value.shape)}")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value.detach().to(torch.float64)
    if isinstance(value, (int, float)):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _got(**named) -> Callable[[], str]:
    """The values named in an error message; only called when a host-side check fails."""
    return lambda: ", got " + " ".join(f"{k}={v.tolist()}" for k, v in named.items())


@dataclass(frozen=True)
class StepCoeffs:
    """The affine Gaussian step ``y = a*x + b*v + std*eps``, per sample.

    ``a``, ``b``, ``std``: fp32 tensors of shape ``(B,)`` (shape ``()`` or ``(1,)`` broadcasts
    over the batch). ``std == 0`` is allowed (a deterministic ODE step) but such a step has no
    log-probability: ``step_logprob`` and ``sample_step`` reject it.

    ``logprob`` is what the ops report as the step's log-probability (docs/math.md,
    "Log-prob conventions"): ``"gaussian"`` (default) the exact log N(y; mean, std^2) per
    element; ``"mse"`` Flow-GRPO's CPS surrogate ``-(y - mean)^2`` per element (no 1/(2 std^2),
    no log std, no log sqrt(2 pi)), with which the same clip range trains differently.
    Either is averaged (or summed) over a sample's elements.

    Values (finite, ``std >= 0``) are checked on the host when the tensors live on the CPU
    (free), and with ``torch._assert_async`` on an accelerator or inside ``torch.compile``, so
    building coefficients on a GPU never waits for it (see ``ops.validate.all_true``).
    """

    a: torch.Tensor
    b: torch.Tensor
    std: torch.Tensor
    logprob: str = "gaussian"

    def __post_init__(self):
        if self.logprob not in _LOGPROBS:
            raise ValueError(f"StepCoeffs.logprob must be one of {_LOGPROBS}, got {self.logprob!r}")
        fields = {}
        for name in ("a", "b", "std"):
            t = getattr(self, name)
            if isinstance(t, (int, float)):
                t = torch.tensor(float(t))
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"StepCoeffs.{name} must be a tensor, got {type(t).__name__}")
            if t.dim() > 1:
                raise ValueError(f"StepCoeffs.{name} must have shape (B,), got {tuple(t.shape)}")
            if not t.is_floating_point():
                raise TypeError(f"StepCoeffs.{name} must be floating point, got {t.dtype}")
            fields[name] = t.detach().to(torch.float32).reshape(-1)
        devices = {t.device for t in fields.values()}
        if len(devices) > 1:
            raise ValueError(f"StepCoeffs tensors must share one device, got {sorted(map(str, devices))}")
        for name, t in fields.items():
            object.__setattr__(self, name, t)
        for name, t in fields.items():
            all_true(torch.isfinite(t), f"StepCoeffs.{name} must be finite", got=_got(**{name: t}))
        std = fields["std"]
        all_true(std >= 0, "StepCoeffs.std must be >= 0", got=_got(std=std))
        # On the CPU the smallest std is read once here, so the ops check it for free.
        host = std.device.type == "cpu" and not torch.compiler.is_compiling()
        min_std = (float(std.min()) if std.numel() else 0.0) if host else None
        object.__setattr__(self, "_min_std", min_std)

    @property
    def batch(self) -> int:
        return max(self.a.numel(), self.b.numel(), self.std.numel())

    def expand(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, std)`` as contiguous fp32 ``(batch,)`` tensors on ``device``."""
        out = []
        for name in ("a", "b", "std"):
            t = getattr(self, name)
            if t.numel() not in (1, batch):
                raise ValueError(
                    f"coeffs.{name} has {t.numel()} values but the batch has B={batch} samples; "
                    f"expected shape ({batch},) or a scalar"
                )
            out.append(t.to(device=device, non_blocking=True).expand(batch).contiguous())
        return tuple(out)

    def check_positive_std(self, op: str) -> None:
        message = f"{op}: coeffs.std must be > 0 for a log-probability; an ODE step (eta = 0) has no log-prob"
        if self._min_std is None:  # device values: an assert queued on the device, no sync
            torch._assert_async((self.std > 0).all(), message)
        elif self._min_std <= 0:
            raise ValueError(f"{message} (got min std {self._min_std})")

    def to(self, device) -> StepCoeffs:
        return StepCoeffs(self.a.to(device), self.b.to(device), self.std.to(device), self.logprob)

    def __getitem__(self, index) -> StepCoeffs:
        """Select samples, e.g. ``coeffs[idx]`` for a minibatch (scalars stay scalars)."""
        pick = lambda t: t if t.numel() == 1 else t[index]
        return StepCoeffs(pick(self.a), pick(self.b), pick(self.std), self.logprob)


def flow_sde_coeffs(sigma, sigma_next, eta, *, variant: str = "dance", sigma_max=None,
                    logprob: str = "gaussian") -> StepCoeffs:
    """Rectified-flow SDE step from ``sigma`` to ``sigma_next < sigma`` (docs/math.md).

    variant:
      ``"dance"``      DanceGRPO: g = eta.
      ``"flow_grpo"``  Flow-GRPO: g = eta * sqrt(sigma / (1 - sigma)); where sigma == 1 the
                       denominator uses ``sigma_max`` (Flow-GRPO passes the schedule's next
                       sigma, ``sigmas[1]``), which is then required.
      ``"cps"``        Flow-GRPO coefficients-preserving sampling: std = sigma' sin(eta pi / 2).

    Then (Euler-Maruyama of dx = (v - g^2/2 score) dt + g dw, score = -(x + (1-sigma) v)/sigma):
        a = 1 + g^2 d / (2 sigma);  b = d (1 + g^2 (1 - sigma) / (2 sigma));  std = g sqrt(-d)
    with d = sigma_next - sigma. ``eta = 0`` gives the deterministic Euler (ODE) step
    a = 1, b = d, std = 0 in every variant (apply it with :func:`dancegrpo.ode_step`).

    logprob: ``"gaussian"`` (default, exact) or ``"mse"``, the surrogate Flow-GRPO's code uses
    with CPS (``variant="cps", logprob="mse"`` reproduces its log-probs); see :class:`StepCoeffs`.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    if logprob not in _LOGPROBS:
        raise ValueError(f"logprob must be one of {_LOGPROBS}, got {logprob!r}")
    s = _as_f64(sigma, "sigma")
    sn = _as_f64(sigma_next, "sigma_next")
    e = _as_f64(eta, "eta")
    # Checked on the host for CPU values, asserted on the device otherwise (no sync).
    all_true((s > 0) & (s <= 1), "sigma must lie in (0, 1]", got=_got(sigma=s))
    all_true((sn >= 0) & (sn < s), "sigma_next must lie in [0, sigma)", got=_got(sigma_next=sn, sigma=s))
    all_true(e >= 0, "eta must be >= 0", got=_got(eta=e))
    d = sn - s
    if variant == "cps":
        std = sn * torch.sin(e * math.pi / 2)
        c = torch.sqrt(torch.clamp(sn * sn - std * std, min=0.0))
        # mean = (1 - s') (x - s v) + c (x + (1 - s) v)
        a = (1 - sn) + c
        b = -(1 - sn) * s + c * (1 - s)
        return StepCoeffs(a.float(), b.float(), std.float(), logprob)
    if variant == "dance":
        g = e  # broadcasts; a 0-d eta from a float stays a CPU scalar, which any device accepts
    else:
        at_one = s >= 1
        if sigma_max is None:
            all_true(~at_one, "variant='flow_grpo' at sigma == 1 needs sigma_max (the schedule's next "
                     "sigma, used in the denominator of sqrt(sigma / (1 - sigma)))")
            denom_sigma = s
        else:
            denom_sigma = torch.where(at_one, _as_f64(sigma_max, "sigma_max"), s)
            all_true(denom_sigma < 1, "sigma_max must be < 1", got=lambda: f", got {sigma_max}")
        g = e * torch.sqrt(s / (1 - denom_sigma))
    a = 1 + g * g * d / (2 * s)
    b = d * (1 + g * g * (1 - s) / (2 * s))
    std = g * torch.sqrt(-d)
    return StepCoeffs(a.float(), b.float(), std.float(), logprob)


def ddim_coeffs(alpha_bar, alpha_bar_prev, eta) -> StepCoeffs:
    """DDIM step with noise ``eta`` for an epsilon-prediction model (docs/math.md).

    x0 = (x - sqrt(1 - ab) eps) / sqrt(ab);  std = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')
    mean = sqrt(ab') x0 + sqrt(1 - ab' - std^2) eps, i.e. a = sqrt(ab' / ab) and
    b = sqrt(1 - ab' - std^2) - sqrt(ab') sqrt(1 - ab) / sqrt(ab). ``eta = 0`` is deterministic
    DDIM (std = 0; apply it with :func:`dancegrpo.ode_step`).
    """
    ab = _as_f64(alpha_bar, "alpha_bar")
    abp = _as_f64(alpha_bar_prev, "alpha_bar_prev")
    e = _as_f64(eta, "eta")
    all_true((ab > 0) & (ab < 1), "alpha_bar must lie in (0, 1)", got=_got(alpha_bar=ab))
    all_true((abp > 0) & (abp <= 1), "alpha_bar_prev must lie in (0, 1]", got=_got(alpha_bar_prev=abp))
    all_true(abp >= ab, "alpha_bar_prev must be >= alpha_bar (a step goes towards the data)",
             got=_got(alpha_bar_prev=abp, alpha_bar=ab))
    all_true(e >= 0, "eta must be >= 0", got=_got(eta=e))
    var = (1 - abp) / (1 - ab) * (1 - ab / abp)
    std = e * torch.sqrt(torch.clamp(var, min=0.0))
    a = torch.sqrt(abp / ab)
    b = torch.sqrt(torch.clamp(1 - abp - std * std, min=0.0)) - torch.sqrt(abp) * torch.sqrt(1 - ab) / torch.sqrt(ab)
    return StepCoeffs(a.float(), b.float(), std.float())


def flow_schedule(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``sigma_i = shift(1 - i/N)`` for i = 0..N with ``shift(t) = s t / (1 + (s - 1) t)``.

    Returns float64 ``(num_steps + 1,)`` from 1 down to 0 (s = 3 FLUX/Wan, 5 HunyuanVideo,
    7 SkyReels).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = 1 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    return shift * t / (1 + (shift - 1) * t)
