"""The public GRPO ops. Each validates its arguments, picks a backend, and runs it.

Backends (``backend=``): ``"torch"`` (the readable reference), ``"native"`` (the compiled
extension), ``"triton"`` (fused Triton kernels), ``"auto"`` (the first that supports the
inputs; ``DANCEGRPO_BACKEND`` overrides it). See ``python -m dancegrpo.env``.
"""

from __future__ import annotations

import torch

from .coeffs import StepCoeffs
from .ops import validate as check
from .ops.dispatch import select_backend
from .ops.reference import AGGREGATES, REDUCTIONS, STD_MODES

__all__ = ["step_logprob", "sample_step", "group_advantages", "clipped_ratio_loss", "grpo_step_loss"]


def _coeffs(op: str, coeffs, batch: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(coeffs, StepCoeffs):
        raise TypeError(f"{op}: coeffs must be a StepCoeffs (see flow_sde_coeffs / ddim_coeffs), "
                        f"got {type(coeffs).__name__}")
    coeffs.check_positive_std(op)
    return coeffs.expand(batch, device)


def _contig(*ts):
    # The ops accept any strides; one copy here is what autograd saves, so backward copies nothing.
    return tuple(None if t is None else t.contiguous() for t in ts)


def step_logprob(model_output, latents, next_latents, coeffs, *, reduction="mean", backend="auto"):
    """Log-probability of ``next_latents`` under the Gaussian step from ``latents``.

    model_output, latents, next_latents: (B, ...) fp32/bf16/fp16 (fp64 with the torch
    backend), same shape, any strides. coeffs: ``StepCoeffs`` with (B,) or scalar fields.
    Returns (B,) fp32 (fp64 for fp64 inputs), differentiable in all three tensors.

    Equivalent PyTorch::

        mean = a[:, None] * x.flatten(1) + b[:, None] * v.flatten(1)
        logp = (-(y.flatten(1) - mean) ** 2 / (2 * std[:, None] ** 2)
                - std[:, None].log() - 0.5 * math.log(2 * math.pi)).mean(1)
    """
    op = "step_logprob"
    check.choice(op, "reduction", reduction, ("mean", "sum"))
    batch, device = check.latents(op, model_output=model_output, latents=latents, next_latents=next_latents)
    a, b, std = _coeffs(op, coeffs, batch, device)
    impl = select_backend(op, backend, (model_output, latents, next_latents))
    v, x, y = _contig(model_output, latents, next_latents)
    return impl.step_logprob(v, x, y, None, a, b, std, reduction)[0]


def sample_step(model_output, latents, coeffs, *, noise=None, generator=None, reduction="mean", backend="auto"):
    """The rollout step: ``next = a x + b v + std * noise`` and its log-prob, in one pass.

    Returns ``(next_latents, logp)``: next_latents in ``latents.dtype`` and shape, logp (B,)
    fp32 of the stored next_latents (so ``step_logprob`` on them reproduces it). Not
    differentiable (rollouts run without grad). ``noise=None`` draws N(0, 1) from
    ``generator`` (on the Triton backend, inside the kernel from a seed the generator gives).

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
        return impl.sample_step(v.detach(), x.detach(), None if n is None else n.detach(), generator,
                                a, b, std, reduction)


def group_advantages(rewards, group_size, *, weights=None, std="group", unbiased=True, eps=1e-8, clip=5.0,
                     aggregate="advantage", nan_policy="raise", backend="auto"):
    """Group-normalised advantages (SPEC section 3), groups contiguous in the batch.

    rewards: (B,) or (B, K) for K reward models, B = prompts * group_size. weights: (K,)
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
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{op}: group_size must be a positive int, got {group_size!r}")
    if batch % group_size:
        raise ValueError(f"{op}: group_size={group_size} does not divide the batch B={batch}")
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
    impl = select_backend(op, backend, (r,))
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
    """PPO/GRPO clipped surrogate on per-sample log-probs (SPEC section 4).

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
                   clip_range_high=None, ref_model_output=None, beta=0.0, backend="auto"):
    """The per-timestep GRPO loss: log-prob, clipped ratio and exact Gaussian KL in one op.

    model_output (B, ...) with grad (bf16 is fine: it is never copied to fp32); latents,
    next_latents (B, ...) from the rollout; old_logp, advantages (B,); ref_model_output
    (B, ...) from the frozen reference, for the KL ``b^2 mean((v - v_ref)^2) / (2 std^2)``.
    The big tensors are read once forward and once backward (one elementwise pass).
    Returns ``(loss, stats)``: 0-d loss; stats: clip_fraction, approx_kl, ratio_mean, kl
    (mean exact KL, when ref_model_output is given) and logp (B,), all detached.

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
    batch, device = check.latents(op, model_output=model_output, latents=latents, next_latents=next_latents,
                                  ref_model_output=ref_model_output)
    check.per_sample(op, batch, device, old_logp=old_logp, advantages=advantages)
    a, b, std = _coeffs(op, coeffs, batch, device)
    impl = select_backend(op, backend, (model_output, latents, next_latents, ref_model_output))
    v, x, y, v_ref = _contig(model_output, latents, next_latents,
                             None if ref_model_output is None else ref_model_output.detach())
    logp, msd = impl.step_logprob(v, x, y, v_ref, a, b, std, "mean")
    loss, raw = impl.clipped_ratio_loss(logp, *_contig(old_logp.detach().to(logp.dtype), advantages.detach().to(logp.dtype)),
                                        None, low, high, 0.0, "mean")
    stats = _stats(raw)
    if msd is not None:
        kl = b.to(msd.dtype) ** 2 * msd / (2 * std.to(msd.dtype) ** 2)
        stats["kl"] = kl.detach().mean()
        if beta > 0:
            loss = loss + beta * kl.mean()
    stats["logp"] = logp.detach()
    return loss, stats
