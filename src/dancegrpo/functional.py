"""The public GRPO ops. Each validates its arguments, picks a backend, and runs it.

Backends (``backend=``): ``"torch"`` (the readable reference), ``"native"`` (the compiled
extension), ``"triton"`` (fused Triton kernels), ``"auto"`` (the first that supports the
inputs; ``DANCEGRPO_BACKEND`` overrides it). See ``python -m dancegrpo.env``.
"""

from __future__ import annotations

import torch

from .coeffs import StepCoeffs
from .ops import reference as ref
from .ops import validate as check
from .ops.dispatch import select_backend
from .ops.reference import AGGREGATES, LOG_SQRT_2PI, NFT_WEIGHTINGS, REDUCTIONS, STD_MODES

__all__ = ["step_logprob", "sample_step", "ode_step", "group_advantages", "clipped_ratio_loss", "grpo_step_loss",
           "nft_loss"]


def _coeffs(op: str, coeffs, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(coeffs, StepCoeffs):
        raise TypeError(f"{op}: coeffs must be a StepCoeffs (see flow_sde_coeffs / ddim_coeffs), "
                        f"got {type(coeffs).__name__}")
    coeffs.check_positive_std(op)
    return coeffs.expand(batch, device)


def _contig(*ts):
    # The ops accept any strides; one copy here is what autograd saves, so backward copies nothing.
    return tuple(None if t is None else t.contiguous() for t in ts)


# Every backend computes the Gaussian log-density. Flow-GRPO's CPS surrogate -(y - mean)^2 (per
# element, coeffs.logprob == "mse") is that density at std = 1, -(y - mean)^2 / 2 - log sqrt(2 pi),
# plus log sqrt(2 pi), times 2: exact scalings (a power of two) of the same kernels' values and
# gradients, so no backend needs a second kernel. The KL keeps the step's real std.
def _kernel_std(coeffs: StepCoeffs, std: torch.Tensor) -> torch.Tensor:
    return std if coeffs.logprob == "gaussian" else torch.ones_like(std)


def _from_kernel(coeffs: StepCoeffs, logp: torch.Tensor, reduction: str, like: torch.Tensor) -> torch.Tensor:
    if coeffs.logprob == "gaussian":
        return logp
    per_sample = like[0].numel() if reduction == "sum" else 1
    return 2 * (logp + LOG_SQRT_2PI * per_sample)


def step_logprob(model_output, latents, next_latents, coeffs, *, reduction="mean", backend="auto"):
    """Log-probability of ``next_latents`` under the Gaussian step from ``latents``.

    model_output, latents, next_latents: (B, ...) fp32/bf16/fp16 (fp64 with the torch
    backend), same shape, any strides. coeffs: ``StepCoeffs`` with (B,) or scalar fields.
    Returns (B,) fp32 (fp64 for fp64 inputs), differentiable in all three tensors.

    Equivalent PyTorch::

        mean = a[:, None] * x.flatten(1) + b[:, None] * v.flatten(1)
        logp = (-(y.flatten(1) - mean) ** 2 / (2 * std[:, None] ** 2)
                - std[:, None].log() - 0.5 * math.log(2 * math.pi)).mean(1)

    With ``coeffs.logprob == "mse"`` (Flow-GRPO's CPS convention, docs/math.md):
    ``logp = (-(y.flatten(1) - mean) ** 2).mean(1)``.
    """
    op = "step_logprob"
    check.choice(op, "reduction", reduction, ("mean", "sum"))
    batch, device = check.latents(op, model_output=model_output, latents=latents, next_latents=next_latents)
    a, b, std = _coeffs(op, coeffs, batch, device)
    impl = select_backend(op, backend, (model_output, latents, next_latents))
    v, x, y = _contig(model_output, latents, next_latents)
    logp = impl.step_logprob(v, x, y, None, a, b, _kernel_std(coeffs, std), reduction)[0]
    return _from_kernel(coeffs, logp, reduction, latents)


def sample_step(model_output, latents, coeffs, *, noise=None, generator=None, reduction="mean", backend="auto"):
    """The rollout step: ``next = a x + b v + std * noise`` and its log-prob, in one pass.

    Returns ``(next_latents, logp)``: next_latents in ``latents.dtype`` and shape, logp (B,)
    fp32 of the stored next_latents (so ``step_logprob`` on them reproduces it). Not
    differentiable (rollouts run without grad). ``noise=None`` draws N(0, 1) from
    ``generator`` (on the Triton backend, inside the kernel from a seed the generator gives).
    The noise always has the step's std; logp follows ``coeffs.logprob`` (with ``"mse"`` it is
    computed by a second pass over the stored sample, exactly as ``step_logprob`` computes it).
    For the deterministic step (std = 0) use :func:`ode_step`.

    Under ``torch.compile`` a ``generator`` cannot enter the graph (dynamo does not trace
    ``torch.Generator`` arguments): with ``fullgraph=True`` that call raises saying so, otherwise
    it runs eagerly after a graph break. Pass ``noise`` drawn outside the compiled region, or
    ``generator=None`` (the global RNG, which traces), to keep the step in the graph.
    """
    op = "sample_step"
    check.choice(op, "reduction", reduction, ("mean", "sum"))
    batch, device = check.latents(op, model_output=model_output, latents=latents, noise=noise)
    a, b, std = _coeffs(op, coeffs, batch, device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is not None and noise is not None:
        raise ValueError(f"{op}: pass noise or generator, not both")
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError(f"{op}: generator= does not trace under torch.compile (a torch.Generator cannot "
                         "enter the graph); pass noise= drawn outside the compiled region, or generator=None")
    impl = select_backend(op, backend, (model_output, latents, noise))
    v, x, n = _contig(model_output, latents, noise)
    with torch.no_grad():
        y, logp = impl.sample_step(v.detach(), x.detach(), None if n is None else n.detach(), generator,
                                   a, b, std, reduction)
        if coeffs.logprob != "gaussian":
            logp = impl.step_logprob(v.detach(), x.detach(), y, None, a, b, _kernel_std(coeffs, std), reduction)[0]
            logp = _from_kernel(coeffs, logp, reduction, latents)
    return y, logp


def ode_step(model_output, latents, coeffs):
    """The deterministic step ``a * latents + b * model_output``, returned in ``latents.dtype``.

    The math runs in fp32 (fp64 when latents or model_output are fp64) whatever the input
    dtypes, and is differentiable. ``coeffs.std`` is ignored: with eta = 0 coefficients
    (``flow_sde_coeffs(s, s_next, 0.0)``: a = 1, b = s_next - s, the Euler step;
    ``ddim_coeffs(ab, ab_prev, 0.0)``: deterministic DDIM; or a sampler's ``ode_coeffs(i)``)
    this is the ODE step used outside a training window; with eta > 0 coefficients it is the
    mean of that stochastic step (not the ODE step).

    Equivalent PyTorch::

        y = (a.view(-1, 1, ...) * latents.float() + b.view(-1, 1, ...) * model_output.float()).to(latents.dtype)
    """
    op = "ode_step"
    batch, device = check.latents(op, model_output=model_output, latents=latents)
    if not isinstance(coeffs, StepCoeffs):
        raise TypeError(f"{op}: coeffs must be a StepCoeffs (see flow_sde_coeffs / ddim_coeffs), "
                        f"got {type(coeffs).__name__}")
    a, b, _ = coeffs.expand(batch, device)
    dt = ref.compute_dtype(model_output, latents)
    col = (batch,) + (1,) * (latents.dim() - 1)
    y = a.to(dt).view(col) * latents.to(dt) + b.to(dt).view(col) * model_output.to(dt)
    return y.to(latents.dtype)


def _group_ids(op: str, batch: int, device, group_size, group_ids) -> torch.Tensor | None:
    """Validate the grouping; None for contiguous groups, else dense (B,) int64 ids on ``device``."""
    if (group_size is None) == (group_ids is None):
        raise ValueError(f"{op}: pass group_size (contiguous groups) or group_ids (any grouping), exactly one")
    if group_ids is None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{op}: group_size must be a positive int, got {group_size!r}")
        if batch % group_size:
            raise ValueError(f"{op}: group_size={group_size} does not divide the batch B={batch}")
        return None
    if not isinstance(group_ids, torch.Tensor):
        group_ids = torch.as_tensor(group_ids)
    if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"{op}: group_ids must be an integer tensor (one group id per sample), got {group_ids.dtype}")
    if group_ids.shape != (batch,):
        raise ValueError(f"{op}: group_ids must have shape ({batch},) (one id per sample), got {tuple(group_ids.shape)}")
    return ref.dense_group_ids(group_ids.to(device=device, dtype=torch.long, non_blocking=True))


def group_advantages(rewards, group_size=None, *, group_ids=None, weights=None, std="group", unbiased=True,
                     eps=1e-8, clip=5.0, aggregate="advantage", nan_policy="raise", backend="auto"):
    """Group-normalised advantages (docs/math.md, "Advantages").

    Groups: ``group_size`` (contiguous groups, B = prompts * group_size) or ``group_ids`` (B,)
    integers, e.g. a prompt index per sample: groups in any order and of any sizes, as a
    multi-process run gathers them. The ``group_ids`` form runs the PyTorch reference on every
    backend (B numbers: a fused kernel would gain nothing). A group of one (valid) sample gets
    advantage 0: it is its own mean.

    rewards: (B,) or (B, K) for K reward models. weights: (K,)
    (default all ones). std: ``"group"`` (DanceGRPO), ``"global"`` (Flow-GRPO: per-group mean,
    batch-wide std), ``"none"`` (Dr.GRPO). aggregate: ``"advantage"`` sums the weighted
    per-reward advantages, ``"reward"`` normalises the weighted reward sum (MixGRPO).
    nan_policy ``"drop"``: a sample with a non-finite reward gets advantage 0 and is left out of
    its group's statistics; ``"raise"`` (default) raises a ValueError naming the samples (under
    ``torch.compile`` the check is an assert inside the graph instead: a RuntimeError on the CPU,
    a device-side assert on a GPU). A constant group gives exactly 0.
    Returns (B,) fp32 (fp64 for fp64 rewards), detached.

    Equivalent PyTorch (one reward, std="group")::

        r = rewards.view(-1, group_size)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).clamp(-clip, clip).flatten()
    """
    op = "group_advantages"
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
    check.tensor(op, "rewards", rewards)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"{op}: rewards must have shape (B,) or (B, K), got {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError(f"{op}: rewards is empty (shape {tuple(rewards.shape)})")
    r = rewards.detach().reshape(rewards.shape[0], -1)
    batch, k = r.shape
    ids = _group_ids(op, batch, r.device, group_size, group_ids)
    check.choice(op, "std", std, STD_MODES)
    check.choice(op, "aggregate", aggregate, AGGREGATES)
    check.choice(op, "nan_policy", nan_policy, ("raise", "drop"))
    # eps > 0 keeps a constant group at 0 / (0 + eps) = 0 rather than 0 / 0.
    eps = check.nonneg_float(op, "eps", eps, positive=std != "none")
    if clip is not None:
        clip = check.nonneg_float(op, "clip", clip, positive=True)
    if not isinstance(unbiased, bool):
        raise TypeError(f"{op}: unbiased must be a bool, got {type(unbiased).__name__}")
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    if weights is None:
        w = torch.ones(k, dtype=dtype, device=r.device)
    else:
        w = torch.as_tensor(weights, dtype=dtype).to(r.device).reshape(-1)
        if w.numel() != k:
            raise ValueError(f"{op}: weights has {w.numel()} values but rewards has K={k} columns")
        check.all_true(torch.isfinite(w), f"{op}: weights must be finite", got=lambda: f", got {w.tolist()}", sync=True)
    r = r.to(dtype).contiguous()
    if nan_policy == "raise":
        finite = torch.isfinite(r).all(1)
        check.all_true(finite, f"{op}: rewards has non-finite values; pass nan_policy='drop' to give them "
                       "advantage 0 and leave them out of the statistics",
                       got=lambda: f" (samples {(~finite).nonzero().flatten().tolist()[:10]})", sync=True)
    impl = select_backend(op, backend, (r,))  # also for group_ids: a bad or unavailable backend still says so
    if ids is not None:
        return ref.group_advantages_by_ids_ref(r, w, ids, std=std, unbiased=unbiased, eps=eps, clip=clip,
                                               aggregate=aggregate, drop_nonfinite=nan_policy == "drop")
    return impl.group_advantages(r, w, group_size, std, unbiased, eps, clip, aggregate, nan_policy == "drop")


def _stats(stats: torch.Tensor) -> dict:
    s = stats.detach()
    return {"clip_fraction": s[0], "approx_kl": s[1], "ratio_mean": s[2]}


def _clip_ranges(op, clip_range, clip_range_high):
    low = check.nonneg_float(op, "clip_range", clip_range)
    high = low if clip_range_high is None else check.nonneg_float(op, "clip_range_high", clip_range_high)
    if low >= 1:
        raise ValueError(f"{op}: clip_range must be < 1 (the ratio is clamped to [1 - clip_range, ...]), got {low}")
    return low, high


def clipped_ratio_loss(logp, old_logp, advantages, *, clip_range=1e-4, clip_range_high=None, ref_logp=None,
                       beta=0.0, reduction="mean", backend="auto"):
    """PPO/GRPO clipped surrogate on per-sample log-probs (docs/math.md, "The loss").

    logp, old_logp, advantages, ref_logp: (B,). ``loss = mean(max(-A r, -A clamp(r, 1 - lo,
    1 + hi)))`` with r = exp(logp - old_logp), lo = clip_range, hi = clip_range_high (default
    lo); with ``ref_logp`` and ``beta > 0`` adds beta times the k3 KL estimator
    ``exp(ref - logp) - (ref - logp) - 1``. Gradient flows to ``logp`` only.
    Returns ``(loss, stats)``: stats holds detached 0-d tensors ``clip_fraction``,
    ``approx_kl`` (0.5 mean (logp - old)^2) and ``ratio_mean``.
    """
    op = "clipped_ratio_loss"
    check.choice(op, "reduction", reduction, REDUCTIONS)
    low, high = _clip_ranges(op, clip_range, clip_range_high)
    beta = check.nonneg_float(op, "beta", beta)
    check.tensor(op, "logp", logp, ndim=1)
    batch, device = logp.shape[0], logp.device
    if batch == 0:
        raise ValueError(f"{op}: logp is empty (B = 0)")
    check.per_sample(op, batch, device, old_logp=old_logp, advantages=advantages, ref_logp=ref_logp)
    if beta > 0 and ref_logp is None:
        raise ValueError(f"{op}: beta > 0 needs ref_logp (the reference policy's log-probs)")
    ref = ref_logp if beta > 0 else None
    impl = select_backend(op, backend, (logp, old_logp, advantages, ref))
    loss, stats = impl.clipped_ratio_loss(*_contig(logp, old_logp.detach(), advantages.detach(),
                                                   None if ref is None else ref.detach()),
                                          low, high, beta, reduction)
    return loss, _stats(stats)


def grpo_step_loss(model_output, latents, next_latents, coeffs, old_logp, advantages, *, clip_range=1e-4,
                   clip_range_high=None, ref_model_output=None, beta=0.0, backend="auto", ratio_norm=False,
                   old_model_output=None):
    """The per-timestep GRPO loss: log-prob, clipped ratio and exact Gaussian KL in one op.

    model_output (B, ...) with grad (bf16 is fine: it is never copied to fp32); latents,
    next_latents (B, ...) from the rollout; old_logp, advantages (B,); ref_model_output
    (B, ...) from the frozen reference, for the KL ``b^2 mean((v - v_ref)^2) / (2 std^2)``.
    The big tensors are read once forward and once backward (one elementwise pass).
    Returns ``(loss, stats)``: 0-d loss; stats: clip_fraction, approx_kl, ratio_mean, kl
    (mean exact KL, when ref_model_output is given) and logp (B,), all detached. The log-prob
    follows ``coeffs.logprob``; the KL is always the exact Gaussian KL of the step (its real
    std), which is also what Flow-GRPO computes for CPS. The readable spec is
    ``dancegrpo.ops.reference.grpo_step_loss_ref``.

    ``ratio_norm=True`` (GRPO-Guard, docs/algorithms.md) clips the normalised log-ratio
    ``std (logp - old_logp) + b^2 mean((v - v_old)^2) / (2 std)`` instead of ``logp - old_logp``:
    the first term rescales each step by its noise level, the second removes the ratio's
    systematic shift below 1. It needs ``old_model_output`` (the rollout's output v_old at
    this step) and the Gaussian log-prob; it uses the same backend kernels (the msd pass with
    v_old), so every backend runs it.

    Equivalent PyTorch::

        logp = step_logprob(model_output, latents, next_latents, coeffs)
        loss, stats = clipped_ratio_loss(logp, old_logp, advantages, clip_range=clip_range)
        loss = loss + beta * (coeffs.b**2 * ((model_output - ref_model_output)**2).flatten(1).mean(1)
                              / (2 * coeffs.std**2)).mean()
    """
    op = "grpo_step_loss"
    low, high = _clip_ranges(op, clip_range, clip_range_high)
    beta = check.nonneg_float(op, "beta", beta)
    if beta > 0 and ref_model_output is None:
        raise ValueError(f"{op}: beta > 0 needs ref_model_output (the frozen reference model's output)")
    if not isinstance(ratio_norm, bool):
        raise TypeError(f"{op}: ratio_norm must be a bool, got {type(ratio_norm).__name__}")
    if ratio_norm and old_model_output is None:
        raise ValueError(f"{op}: ratio_norm=True needs old_model_output (the rollout's model output at this step)")
    if ratio_norm and isinstance(coeffs, StepCoeffs) and coeffs.logprob != "gaussian":
        raise ValueError(f"{op}: ratio_norm=True normalises the Gaussian log-ratio; coeffs.logprob is "
                         f"{coeffs.logprob!r}")
    batch, device = check.latents(op, model_output=model_output, latents=latents, next_latents=next_latents,
                                  ref_model_output=ref_model_output,
                                  old_model_output=old_model_output if ratio_norm else None)
    check.per_sample(op, batch, device, old_logp=old_logp, advantages=advantages)
    a, b, std = _coeffs(op, coeffs, batch, device)
    impl = select_backend(op, backend, (model_output, latents, next_latents, ref_model_output,
                                        old_model_output if ratio_norm else None))
    v, x, y, v_ref = _contig(model_output, latents, next_latents,
                             None if ref_model_output is None else ref_model_output.detach())
    v_old = _contig(old_model_output.detach())[0] if ratio_norm else None
    # ratio_norm: the msd pass of the same kernel gives mean((v - v_old)^2); the KL's msd (v_ref)
    # then takes a second pass.
    logp, msd = impl.step_logprob(v, x, y, v_old if ratio_norm else v_ref, a, b, _kernel_std(coeffs, std), "mean")
    logp = _from_kernel(coeffs, logp, "mean", latents)
    old = old_logp.detach().to(logp.dtype)
    if ratio_norm:
        s_, b_ = std.to(logp.dtype), b.to(logp.dtype)
        logp = s_ * (logp - old) + b_ ** 2 * msd / (2 * s_)  # the normalised log-ratio
        old = torch.zeros_like(old)
        msd = None if v_ref is None else impl.step_logprob(v, x, y, v_ref, a, b, _kernel_std(coeffs, std), "mean")[1]
    loss, raw = impl.clipped_ratio_loss(logp, *_contig(old, advantages.detach().to(logp.dtype)),
                                        None, low, high, 0.0, "mean")
    stats = _stats(raw)
    if msd is not None:
        kl = b.to(msd.dtype) ** 2 * msd / (2 * std.to(msd.dtype) ** 2)
        stats["kl"] = kl.detach().mean()
        if beta > 0:
            loss = loss + beta * kl.mean()
    stats["logp"] = logp.detach()
    return loss, stats


def nft_loss(model_output, old_model_output, target, optimality, t, *, beta=1.0, weighting="adaptive", eps=1e-5,
             backend="auto"):
    """DiffusionNFT's loss on forward-noised samples (docs/algorithms_nft.md), in one fused pass.

    model_output (B, ...) the trained velocity v on x_t (with grad; bf16 is fine);
    old_model_output (B, ...) the frozen old policy's velocity on the same x_t; target (B, ...)
    the flow-matching velocity ``noise - x0`` of ``x_t = (1 - t) x0 + t noise``; optimality
    (B,) the probabilities r in [0, 1] that each sample is "positive"; t (B,) the noise levels.
    beta > 0 sets the implicit policies ``v_pos = (1 - beta) v_old + beta v`` and
    ``v_neg = (1 + beta) v_old - beta v``. ``weighting="adaptive"`` measures each error in
    x0 space, ``t (v - target)``, divided by its detached per-sample mean absolute value
    (floored at eps); ``"none"`` is the plain velocity MSE. Gradient flows to model_output only.

    Returns ``(loss, stats)``: 0-d loss = mean over the batch of ``(r L_pos + (1 - r) L_neg) /
    beta``; stats (detached 0-d): positive_loss, negative_loss (batch means of L_pos, L_neg) and
    old_deviation (mean squared distance of v to v_old). The readable spec is
    ``dancegrpo.ops.reference.nft_loss_ref``.

    Equivalent PyTorch (weighting="none")::

        pos = (1 - beta) * v_old + beta * v
        neg = (1 + beta) * v_old - beta * v
        l_pos = ((pos - target) ** 2).flatten(1).mean(1)
        l_neg = ((neg - target) ** 2).flatten(1).mean(1)
        loss = ((r * l_pos + (1 - r) * l_neg) / beta).mean()
    """
    op = "nft_loss"
    check.choice(op, "weighting", weighting, NFT_WEIGHTINGS)
    beta = check.nonneg_float(op, "beta", beta, positive=True)
    eps = check.nonneg_float(op, "eps", eps, positive=True)
    for name, value in (("model_output", model_output), ("old_model_output", old_model_output), ("target", target)):
        check.tensor(op, name, value)
    batch, device = check.latents(op, model_output=model_output, old_model_output=old_model_output, target=target)
    check.per_sample(op, batch, device, optimality=optimality, t=t)
    check.all_true((optimality >= 0) & (optimality <= 1), f"{op}: optimality must lie in [0, 1]",
                   got=lambda: f", got {optimality.detach().flatten().tolist()[:8]}")
    impl = select_backend(op, backend, (model_output, old_model_output, target))
    dt = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    v, v_old, tgt, r, tt = _contig(model_output, old_model_output.detach(), target.detach(),
                                   optimality.detach().to(dt), t.detach().to(dt))
    per, parts = impl.nft_loss(v, v_old, tgt, r, tt, beta, eps, weighting == "adaptive")
    p = parts.detach().mean(0)
    return per.mean(), {"positive_loss": p[0], "negative_loss": p[1], "old_deviation": p[4]}
