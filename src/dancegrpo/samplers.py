"""Samplers: the scalar side of a rollout (the math: docs/math.md).

A sampler turns a step index ``i`` (from ``i`` to ``i + 1``, ``i = 0..num_steps-1``) into

* ``model_timesteps(i)``: what the network is fed at step ``i`` (flow: 1000 sigma_i; DDIM: the
  DDPM step t_i),
* ``coeffs(i, batch)``: the stochastic step as an affine Gaussian ``y = a x + b v + std eps``,
* ``ode_step(i, x, v)``: the deterministic step (eta = 0), used outside a training window,
* ``x0(i, x, v)``: the clean-sample prediction that is decoded and scored.

A flow sampler can also integrate the deterministic *tail* of a rollout (every step after the
last SDE step) with DPM-Solver++(2M) instead of Euler (``solver="dpmpp_2m"``), on a compressed
grid of fewer steps (``post_compress`` < 1): MixGRPO-Flash (docs/algorithms.md). The SDE steps,
and so every trained log-probability, are unchanged.

Both samplers expose the same methods, so the trainer never branches on the model family.
``i`` may be an int (every sample at the same step) or a (B,) integer tensor (one step per
sample, as in a training minibatch that mixes timesteps).
"""

from __future__ import annotations

import math

import torch

from .coeffs import StepCoeffs, ddim_coeffs, flow_schedule, flow_sde_coeffs
from .functional import ode_step

__all__ = ["FlowSampler", "DDIMSampler", "scaled_linear_alphas_cumprod", "build_sampler", "dpmpp_2m_coeffs",
           "SOLVERS"]

_FLOW_VARIANTS = ("dance", "flow_grpo", "cps")
SOLVERS = ("euler", "dpmpp_2m")


def dpmpp_2m_coeffs(s: float, s_next: float, s_prev: float | None = None) -> tuple[float, float, float]:
    """DPM-Solver++(2M) step of the rectified-flow ODE (alpha = 1 - sigma) from sigma ``s`` to
    ``s_next`` as ``y = cx x + c0 x0 + c1 x0_prev``: x0 is the data prediction at (x, s), x0_prev
    the one at the previous grid point ``s_prev`` (None: first order, which is the Euler step).

    With lambda = log(alpha / sigma), h = lambda_next - lambda, r = (lambda - lambda_prev) / h:
    ``y = (s_next / s) x + alpha_next (1 - e^-h) ((1 + 1/(2r)) x0 - 1/(2r) x0_prev)`` (Lu et al.
    2022, arXiv 2211.01095, Alg. 2). e^-h is formed as a ratio so sigma = 1 (alpha = 0) and
    s_next = 0 need no infinity. The step to sigma = 0 and a step whose previous point has
    alpha = 0 are first order (as DPM-Solver's lower-order final step).
    """
    a, a_next = 1.0 - s, 1.0 - s_next
    exp_neg_h = (s_next * a) / (s * a_next)
    cx = s_next / s
    c = a_next * (1.0 - exp_neg_h)  # weight of D
    if s_prev is None or s_next == 0.0 or s_prev >= 1.0:
        return cx, c, 0.0
    a_prev = 1.0 - s_prev
    lam = lambda al, si: math.log(al / si)
    r = (lam(a, s) - lam(a_prev, s_prev)) / (lam(a_next, s_next) - lam(a, s))
    return cx, c * (1.0 + 0.5 / r), -c * 0.5 / r


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite float >= 0, got {eta!r}")
    return float(eta)


def _broadcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () per-sample scalars -> shape (B, 1, 1, ...) for ``like`` (B, ...)."""
    t = t.to(device=like.device, dtype=torch.float32)
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _given_sigmas(sigmas, num_steps: int) -> torch.Tensor:
    """A caller's flow schedule as float64 (N + 1,): decreasing, in (0, 1], ending at 0."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if s.numel() != num_steps + 1:
        raise ValueError(f"sigmas must hold num_steps + 1 = {num_steps + 1} values, got {s.numel()}")
    if not (bool((s[:-1] > 0).all()) and bool((s[:-1] <= 1).all()) and float(s[-1]) == 0.0
            and bool((s[1:] < s[:-1]).all())):
        raise ValueError(f"sigmas must decrease from (0, 1] to exactly 0, got {s.tolist()}")
    return s


def _given_timesteps(timesteps, num_steps: int) -> torch.Tensor:
    t = torch.as_tensor(timesteps).detach().to("cpu", torch.float32).flatten()
    if t.numel() != num_steps or not bool(torch.isfinite(t).all()):
        raise ValueError(f"timesteps must hold num_steps = {num_steps} finite values, got {t.tolist()}")
    return t


class _Sampler:
    """Shared plumbing; subclasses fill ``_table`` with per-step float64 rows."""

    num_steps: int
    prediction: str
    solver: str = "euler"
    post_compress: float = 1.0

    def tail_start(self, sde_mask: torch.Tensor) -> int | None:
        """First grid point of the deterministic tail that :meth:`FlowSampler.integrate_tail`
        runs (the step after the last SDE step; 0 when there is none), or None when every step
        is taken one by one on the grid (Euler, no compression)."""
        if self.solver == "euler" and self.post_compress >= 1:
            return None
        sde = sde_mask.nonzero().flatten()
        start = int(sde[-1]) + 1 if sde.numel() else 0
        return start if start < self.num_steps else None

    def _index(self, i) -> torch.Tensor:
        """Step index as a long tensor (shape () or (B,)), range-checked."""
        if isinstance(i, torch.Tensor):
            if i.dtype not in (torch.int32, torch.int64) or i.dim() > 1:
                raise TypeError(f"step index must be an int or a (B,) integer tensor, got {i.dtype} {tuple(i.shape)}")
            idx = i.detach().to("cpu", torch.long)
        elif isinstance(i, int) and not isinstance(i, bool):
            idx = torch.tensor(i, dtype=torch.long)
        else:
            raise TypeError(f"step index must be an int or a (B,) integer tensor, got {type(i).__name__}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_steps):
            raise ValueError(f"step index must lie in [0, {self.num_steps}), got {idx.tolist()}")
        return idx

    @staticmethod
    def _per_sample(values: torch.Tensor, batch: int | None) -> torch.Tensor:
        if batch is None or values.dim() == 1:
            return values
        return values.expand(batch)

    def _step(self, table: StepCoeffs, i, batch: int | None) -> StepCoeffs:
        idx = self._index(i)
        pick = lambda t: self._per_sample(t[idx], batch)
        return StepCoeffs(pick(table.a), pick(table.b), pick(table.std), table.logprob)

    def coeffs(self, i, batch: int | None = None) -> StepCoeffs:
        """The SDE step ``i -> i + 1`` as per-sample ``StepCoeffs`` ((batch,) fields)."""
        return self._step(self._sde, i, batch)

    def ode_coeffs(self, i, batch: int | None = None) -> StepCoeffs:
        """The deterministic (eta = 0) step ``i -> i + 1``; std is 0."""
        return self._step(self._ode, i, batch)

    def is_stochastic(self, i: int) -> bool:
        """Whether step ``i`` has noise (std > 0) and so a log-probability to train."""
        return bool(self.coeffs(i).std.min() > 0)

    def ode_step(self, i, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The deterministic step (the sampler with eta = 0): ``y = a0 x + b0 v``, in x's dtype."""
        return ode_step(v, x, self.ode_coeffs(i))


class FlowSampler(_Sampler):
    """Rectified-flow sampler: Euler-Maruyama SDE (DanceGRPO / Flow-GRPO / CPS) or Euler ODE.

    sigmas from :func:`dancegrpo.flow_schedule` (``num_steps + 1`` values, 1 -> 0), or the given
    ``sigmas`` (``num_steps + 1`` values ending at 0, e.g. a diffusers scheduler's) and model
    ``timesteps`` (default ``1000 sigma``). The model predicts the velocity ``v``;
    ``x0 = x - sigma v``; the ODE step is ``y = x + (sigma' - sigma) v``.
    ``logprob="mse"`` gives the SDE steps Flow-GRPO's CPS log-prob convention (see
    :class:`dancegrpo.StepCoeffs`); a trainer that stores (a, b, std) must carry it too.
    """

    prediction = "velocity"

    def __init__(self, num_steps: int, shift: float = 1.0, eta: float = 0.3, variant: str = "dance",
                 logprob: str = "gaussian", *, sigmas=None, timesteps=None, solver: str = "euler",
                 post_compress: float = 1.0):
        self.num_steps = _check_int("num_steps", num_steps)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"shift must be a float > 0, got {shift!r}")
        self.shift = float(shift)
        self.eta = _check_eta(eta)
        if variant not in _FLOW_VARIANTS:
            raise ValueError(f"variant must be one of {_FLOW_VARIANTS}, got {variant!r}")
        self.variant = variant
        if sigmas is None:
            self.sigmas = flow_schedule(self.num_steps, self.shift)  # float64 (N + 1,)
        else:  # a given schedule, e.g. a diffusers scheduler's (then ``shift`` is not used)
            self.sigmas = _given_sigmas(sigmas, self.num_steps)
        self._generated = sigmas is None
        self._timesteps = None if timesteps is None else _given_timesteps(timesteps, self.num_steps)
        self.set_solver(solver, post_compress)
        # Scalar work is done once here: one (a, b, std) row per step, for the SDE and the ODE.
        s, sn = self.sigmas[:-1], self.sigmas[1:]
        # Flow-GRPO at sigma = 1 uses the schedule's next sigma in sqrt(sigma / (1 - sigma)).
        sigma_max = float(self.sigmas[1]) if variant == "flow_grpo" else None
        self._sde = flow_sde_coeffs(s, sn, self.eta, variant=variant, sigma_max=sigma_max, logprob=logprob)
        self.logprob = logprob
        self._ode = flow_sde_coeffs(s, sn, 0.0)

    def model_timesteps(self, i, batch: int | None = None) -> torch.Tensor:
        """fp32 ``1000 * sigma_i`` (or the given timesteps), shape () for an int ``i`` (or
        (batch,)), (B,) for a tensor."""
        if self._timesteps is not None:
            return self._per_sample(self._timesteps[self._index(i)], batch)
        return self._per_sample((1000.0 * self.sigmas[self._index(i)]).float(), batch)

    def sigma(self, i) -> torch.Tensor:
        """float64 sigma_i at step ``i``."""
        return self.sigmas[self._index(i)]

    def x0(self, i, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Clean prediction ``x - sigma_i v`` (what DanceGRPO decodes and scores), in x's dtype."""
        s = self.sigmas[self._index(i)].float()
        return (x.float() - _broadcast(s, x) * v.float()).to(x.dtype)

    # ------------------------------------------------------------------ the deterministic tail

    def set_solver(self, solver: str, post_compress: float = 1.0) -> FlowSampler:
        """Choose the tail's solver (``euler`` | ``dpmpp_2m``) and compression: the tail after an
        SDE window keeps ``max(1, int(post_compress (R + 1)) - 1)`` of its R steps (MixGRPO-Flash's
        ``dpm_post_compress_ratio``; 1 keeps them all)."""
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if isinstance(post_compress, bool) or not isinstance(post_compress, (int, float)) or \
                not 0 < post_compress <= 1:
            raise ValueError(f"post_compress must lie in (0, 1], got {post_compress!r}")
        self.solver, self.post_compress = solver, float(post_compress)
        return self

    def _sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        """float64 sigma at fractional grid positions ``u`` in [0, N]: the schedule's own formula
        (uniform t, shifted) for a generated schedule, linear interpolation for a given one."""
        if self._generated:
            t = 1 - u / self.num_steps
            return self.shift * t / (1 + (self.shift - 1) * t)
        return _interp(self.sigmas, u)

    def tail_grid(self, start: int, compress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The tail from grid point ``start`` to sigma 0: ``(sigmas (M + 1,) float64, model
        timesteps (M,) fp32, positions (M + 1,) float64: the points' fractional grid indices)``.

        Compressed (``compress`` and post_compress < 1), its M points are uniform in the
        schedule's time between ``start`` and N (MixGRPO-Flash rebuilds the post-window schedule
        the same way: linspace in t, then the shift); else M = N - start, the grid itself."""
        remaining = self.num_steps - start
        m = remaining
        if compress and self.post_compress < 1:
            m = max(1, int(self.post_compress * (remaining + 1)) - 1)
        u = torch.linspace(start, self.num_steps, m + 1, dtype=torch.float64)
        if m == remaining:
            u = torch.arange(start, self.num_steps + 1, dtype=torch.float64)
        sig = self.sigmas[start:].clone() if m == remaining else self._sigma_at(u)
        sig[0], sig[-1] = self.sigmas[start], 0.0
        if self._timesteps is not None:
            ts = _interp(torch.cat([self._timesteps.double(), torch.zeros(1, dtype=torch.float64)]), u[:-1]).float()
        else:
            ts = (1000.0 * sig[:-1]).float()
        return sig, ts, u

    @torch.no_grad()
    def integrate_tail(self, start: int, x: torch.Tensor, predict, *, prev=None, compress: bool = True):
        """Integrate the ODE from grid point ``start`` to sigma 0 with ``self.solver``.

        predict: ``(x, model_timesteps (B,)) -> v`` (one network call each); prev: ``(x0, sigma)``
        of the step before ``start`` (the 2M history; None starts first order). Returns
        ``(states, x0_last, calls)``: states (M + 1 tensors, x first, the final sample last, in
        x's dtype), the last step's clean prediction, and the number of network calls M.
        """
        sig, ts, _ = self.tail_grid(start, compress)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        states, hist = [x], prev
        x0 = None
        for j in range(sig.numel() - 1):
            s, s_next = float(sig[j]), float(sig[j + 1])
            v = predict(x, ts[j].expand(x.shape[0]).to(x.device)).to(dt)
            xc = x.to(dt)
            x0 = xc - s * v
            if self.solver == "euler":
                y = xc + (s_next - s) * v
            else:
                cx, c0, c1 = dpmpp_2m_coeffs(s, s_next, None if hist is None else float(hist[1]))
                y = cx * xc + c0 * x0
                if c1 != 0.0:
                    y = y + c1 * hist[0].to(dt)
            hist = (x0, s)
            x = y.to(states[0].dtype)
            states.append(x)
        return states, x0.to(states[0].dtype), sig.numel() - 1

    def __repr__(self) -> str:
        extra = "" if self.logprob == "gaussian" else f", logprob={self.logprob!r}"
        if self.solver != "euler" or self.post_compress < 1:
            extra += f", solver={self.solver!r}, post_compress={self.post_compress}"
        return (f"FlowSampler(num_steps={self.num_steps}, shift={self.shift}, eta={self.eta}, "
                f"variant={self.variant!r}{extra})")


def _interp(table: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``table`` (float64, indexed 0..len-1) linearly interpolated at fractional positions ``u``."""
    lo = u.floor().long().clamp(0, table.numel() - 1)
    hi = (lo + 1).clamp(max=table.numel() - 1)
    w = u - lo.double()
    return table[lo] * (1 - w) + table[hi] * w


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion 1.x's "scaled_linear" schedule: betas linear in sqrt space.

    Returns float64 alpha-bar, shape (num_train_timesteps,).
    """
    _check_int("num_train_timesteps", num_train_timesteps, 2)
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class DDIMSampler(_Sampler):
    """DDIM with noise ``eta`` for an epsilon-prediction model (docs/math.md).

    alphas_cumprod: (T,) alpha-bar of the training schedule (e.g. 1000 steps). Timesteps use
    "leading" spacing ``t_i = (num_steps - 1 - i) * (T // num_steps) + steps_offset`` (SD 1.x:
    steps_offset = 1); the step goes to ``t_i - T // num_steps``, whose alpha-bar is
    ``final_alpha_cumprod`` (default alpha-bar[0], SD's ``set_alpha_to_one=False``) below 0.
    ``timesteps``: N decreasing DDPM steps to use instead of the leading spacing.
    """

    prediction = "epsilon"

    def __init__(self, alphas_cumprod, num_steps: int = 50, eta: float = 1.0, steps_offset: int = 1,
                 final_alpha_cumprod: float | None = None, *, timesteps=None):
        self.num_steps = _check_int("num_steps", num_steps)
        self.eta = _check_eta(eta)
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if ab.dim() != 1 or ab.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of length >= 2, got shape {tuple(ab.shape)}")
        if not bool(((ab > 0) & (ab < 1)).all()) or not bool((ab[1:] <= ab[:-1]).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1) and be non-increasing")
        total = ab.numel()
        if self.num_steps > total:
            raise ValueError(f"num_steps={num_steps} exceeds the {total} training timesteps of alphas_cumprod")
        _check_int("steps_offset", steps_offset, 0)
        ratio = total // self.num_steps
        if timesteps is None:
            ts = (torch.arange(self.num_steps - 1, -1, -1, dtype=torch.long) * ratio + steps_offset).clamp(max=total - 1)
        else:  # a given spacing (e.g. a diffusers scheduler's "trailing"); each step still goes t -> t - T // N
            ts = torch.as_tensor(timesteps).detach().to("cpu", torch.long).flatten()
            if ts.numel() != self.num_steps or int(ts.min()) < 0 or int(ts.max()) >= total or \
                    not bool((ts[1:] < ts[:-1]).all()):
                raise ValueError(f"timesteps must be {self.num_steps} decreasing ints in [0, {total}), got {ts.tolist()}")
        prev = ts - ratio
        final = float(ab[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
        if not 0 < final <= 1:
            raise ValueError(f"final_alpha_cumprod must lie in (0, 1], got {final}")
        self.alphas_cumprod = ab
        self.timesteps = ts
        self.ab_t = ab[ts]
        self.ab_prev = torch.where(prev >= 0, ab[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
        self._sde = ddim_coeffs(self.ab_t, self.ab_prev, self.eta)
        self._ode = ddim_coeffs(self.ab_t, self.ab_prev, 0.0)

    def model_timesteps(self, i, batch: int | None = None) -> torch.Tensor:
        """fp32 DDPM step t_i (what an SD UNet is fed)."""
        return self._per_sample(self.timesteps[self._index(i)].float(), batch)

    def x0(self, i, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(x - sqrt(1 - ab_t) eps) / sqrt(ab_t)``, in x's dtype."""
        ab = self.ab_t[self._index(i)]
        sa, s1 = _broadcast(ab.sqrt(), x), _broadcast((1 - ab).sqrt(), x)
        return ((x.float() - s1 * v.float()) / sa).to(x.dtype)

    def __repr__(self) -> str:
        return f"DDIMSampler(num_steps={self.num_steps}, eta={self.eta}, T={self.alphas_cumprod.numel()})"


def build_sampler(kind: str, model=None, *, num_steps: int, eta: float, shift: float = 1.0,
                  variant: str = "dance", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, steps_offset: int = 1, logprob: str = "gaussian", solver: str = "euler",
                  post_compress: float = 1.0):
    """A sampler from config values. ``kind="auto"`` follows ``model.prediction`` (velocity ->
    flow, epsilon -> DDIM). DDIM uses ``model.alphas_cumprod`` when the model has one, else the
    scaled-linear schedule from ``beta_start``/``beta_end``. ``kind="scheduler"``: the model's own
    schedule (``model.scheduler_sampler``, e.g. a diffusers pipeline's scheduler with its shift)."""
    prediction = getattr(model, "prediction", None)
    if kind == "scheduler":
        if not callable(getattr(model, "scheduler_sampler", None)):
            raise ValueError(f"sampler kind 'scheduler' needs a model with its own scheduler (diffusers models: "
                             f"sd, sd3, flux, qwen_image); {type(model).__name__} has none: use kind 'flow' or 'ddim'")
        sampler = model.scheduler_sampler(num_steps, eta=eta, variant=variant)
    else:
        if kind == "auto":
            if prediction not in ("velocity", "epsilon"):
                raise ValueError(f"sampler kind 'auto' needs model.prediction 'velocity' or 'epsilon', got {prediction!r}")
            kind = "flow" if prediction == "velocity" else "ddim"
        if kind == "flow":
            sampler = FlowSampler(num_steps, shift=shift, eta=eta, variant=variant, logprob=logprob)
        elif kind == "ddim":
            if logprob != "gaussian":
                raise ValueError(f"logprob={logprob!r} is a flow-sampler convention (Flow-GRPO's CPS); "
                                 "the ddim sampler uses the Gaussian log-prob")
            ab = getattr(model, "alphas_cumprod", None)
            if ab is None:
                ab = scaled_linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
            sampler = DDIMSampler(ab, num_steps, eta, steps_offset=steps_offset)
        else:
            raise ValueError(f"sampler kind must be 'auto', 'flow', 'ddim' or 'scheduler', got {kind!r}")
        if prediction is not None and prediction != sampler.prediction:
            raise ValueError(f"model predicts {prediction!r} but the {kind!r} sampler expects {sampler.prediction!r}")
    if solver != "euler" or post_compress != 1:
        if not isinstance(sampler, FlowSampler):
            raise ValueError(f"solver={solver!r} / post_compress={post_compress} need a flow sampler (rectified "
                             f"flow); the {kind!r} sampler here is {type(sampler).__name__}: use solver 'euler'")
        sampler.set_solver(solver, post_compress)
    return sampler
