"""Rollouts: G samples per prompt through the SDE sampler, trajectories kept.

For a batch of P prompts the policy samples B = P * G trajectories (groups contiguous), in
eval mode and without grad, through :func:`dancegrpo.sample_step` at stochastic steps and the
sampler's ODE step elsewhere (MixGRPO windows). What the update needs is kept: the latents at
every step (x_{i+1} is step i's sampled next latent), the rollout log-probs, the per-sample
step coefficients, the model timesteps and the conditioning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..coeffs import StepCoeffs
from ..functional import sample_step
from ..models.interface import Conditioning, repeat, select

__all__ = ["Rollout", "collect_rollout", "encode_items", "autocast_context"]


@dataclass
class Rollout:
    """B trajectories of N steps. Tensors are on ``latents.device`` (host memory when the
    rollout was asked to store on CPU).

    latents:   (B, N + 1, *latent_shape), x_0 (noise) .. x_N, in the model's latent dtype.
    log_probs: (B, N) fp32 rollout log-prob of x_{i+1} given x_i (NaN at ODE steps).
    a, b, std: (B, N) fp32 coefficients of each step (std = 0 at ODE steps).
    timesteps: (B, N) fp32 model timesteps.
    sde_mask:  (N,) bool, the steps that were stochastic.
    cond:      conditioning, batch first. prompts: B strings. samples: (B, 3, [T,] H, W) decoded.
    nfe:       network evaluations spent, summed over samples (B per batched call).
    outputs:   (B, N, *latent_shape) the rollout's model outputs at its SDE steps (zeros
               elsewhere), kept only when asked (GRPO-Guard's ratio normalisation needs them).

    A tail integrated by the sampler (``solver: dpmpp_2m`` or ``post_compress`` < 1, after the
    last SDE step) has no (a, b, std) rows (zeros) and, compressed, fewer points than the grid:
    a grid point it skips holds the latest tail state before it.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    std: torch.Tensor
    timesteps: torch.Tensor
    sde_mask: torch.Tensor
    cond: Conditioning
    prompts: list[str]
    samples: torch.Tensor
    nfe: int = 0
    outputs: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> Rollout:
        """The trajectories ``index`` (a (k,) long tensor), e.g. after best-of-N selection."""
        idx = index.to(self.latents.device)
        return replace(self, latents=self.latents[idx], log_probs=self.log_probs[idx], a=self.a[idx],
                       b=self.b[idx], std=self.std[idx], timesteps=self.timesteps[idx],
                       cond=select(self.cond, idx), prompts=[self.prompts[i] for i in index.tolist()],
                       samples=self.samples[idx.to(self.samples.device)],
                       outputs=None if self.outputs is None else self.outputs[idx])

    def step_batch(self, samples: torch.Tensor, steps: torch.Tensor, device):
        """Training inputs of (sample, step) pairs: samples, steps (k,) long.

        Returns ``(x, y, timesteps, coeffs, old_logp, cond)`` on ``device``.
        """
        src = self.latents.device
        s, t = samples.to(src), steps.to(src)
        x = self.latents[s, t].to(device, non_blocking=True)
        y = self.latents[s, t + 1].to(device, non_blocking=True)
        coeffs = StepCoeffs(self.a[s, t], self.b[s, t], self.std[s, t]).to(device)
        cond = {k: v.to(device, non_blocking=True) for k, v in select(self.cond, s).items()}
        return (x, y, self.timesteps[s, t].to(device), coeffs, self.log_probs[s, t].to(device), cond)

    def old_outputs(self, samples: torch.Tensor, steps: torch.Tensor, device) -> torch.Tensor:
        """The rollout's model outputs at (sample, step) pairs (collected with keep_outputs)."""
        if self.outputs is None:
            raise ValueError("this rollout kept no model outputs: collect it with keep_outputs=True")
        src = self.outputs.device
        return self.outputs[samples.to(src), steps.to(src)].to(device, non_blocking=True)


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 autocast of the network when asked (log-probs are computed in fp32 regardless)."""
    if mixed_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_items(model, items: Sequence, device) -> tuple[list[str], Conditioning]:
    """Prompt texts and the model's conditioning for dataset items (``.text``, ``.image``)."""
    texts = [it.text for it in items]
    images = [getattr(it, "image", None) for it in items]
    if any(im is not None for im in images):
        if any(im is None for im in images):
            raise ValueError("a prompt batch mixes items with and without a first-frame image")
        img = torch.stack([torch.as_tensor(im) for im in images]).to(device)
    else:
        img = None
    cond = model.encode_prompts(texts, img) if img is not None else model.encode_prompts(texts)
    return texts, {k: v.to(device) for k, v in cond.items()}


def _chunks(total: int, size: int):
    size = total if size <= 0 else size
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


@torch.no_grad()
def collect_rollout(model, sampler, items: Sequence, group_size: int, sde_mask: torch.Tensor,
                    generator: torch.Generator, *, device, share_noise: bool = True, chunk: int = 0,
                    store_on_cpu: bool = False, mixed_precision: str = "no", decode: str = "x0",
                    backend: str = "auto", noise=None, rows: slice | None = None, on_samples=None,
                    keep_outputs: bool = False) -> Rollout:
    """Roll out ``group_size`` samples for each prompt item (eval mode, no grad).

    sde_mask: (N,) bool, steps sampled with noise (the rest take the ODE step). The generator
    (on ``device``) draws the initial noise (shared within a group when ``share_noise``) and the
    step noise. Returns a :class:`Rollout` with the decoded samples.

    noise: a :class:`~dancegrpo.trainer.noise.SampleNoise` drawing each sample's noise from its
    global index instead (``generator`` is then unused). rows: the samples (of the P * G, groups
    contiguous) this process makes; every prompt is still encoded, so the conditioning of a
    sample does not depend on how the batch is split.

    ``on_samples(slice, samples, prompts)``: roll out chunk by chunk instead (every step of
    chunk k before chunk k+1, see :func:`_collect_by_chunk`) and hand each chunk's decoded
    samples over as soon as they exist, so they can be scored while the next chunk rolls out.

    keep_outputs: also keep the model outputs at the SDE steps (GRPO-Guard's ratio normalisation).
    A sampler with a solver tail (``tail_start``: a higher-order or compressed ODE after the last
    SDE step) integrates that tail itself.
    """
    device = torch.device(device)
    n_steps = sampler.num_steps
    if sde_mask.shape != (n_steps,):
        raise ValueError(f"sde_mask must have shape ({n_steps},), got {tuple(sde_mask.shape)}")
    tail = getattr(sampler, "tail_start", lambda mask: None)(sde_mask)
    if on_samples is not None and (tail is not None or keep_outputs):
        raise ValueError("a chunk-by-chunk rollout (async rewards) supports neither a solver tail nor keep_outputs")
    was_training = model.training if hasattr(model, "training") else False
    if hasattr(model, "eval"):
        model.eval()
    try:
        texts, cond = encode_items(model, items, device)
        prompts = [t for t in texts for _ in range(group_size)]
        cond = repeat(cond, group_size)
        if rows is not None:
            prompts, cond = prompts[rows], select(cond, rows)
        batch = len(prompts)
        shape = tuple(model.latent_shape())
        if noise is not None:
            x = noise.initial(shape, device)
        elif share_noise:
            x = torch.randn((len(items), *shape), generator=generator, device=device).repeat_interleave(group_size, 0)
        else:
            x = torch.randn((batch, *shape), generator=generator, device=device)
        store = torch.device("cpu") if store_on_cpu else device
        latents = torch.empty((batch, n_steps + 1, *shape), dtype=x.dtype, device=store)
        log_probs = torch.full((batch, n_steps), float("nan"), dtype=torch.float32, device=store)
        a = torch.zeros((batch, n_steps), dtype=torch.float32, device=store)
        b, std, ts = torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(a)
        outputs = torch.zeros((batch, n_steps, *shape), dtype=x.dtype, device=store) if keep_outputs else None
        latents[:, 0] = x.to(store)
        samples, calls = None, 0
        if on_samples is not None:  # every step of each chunk, scored as it finishes
            samples = _collect_by_chunk(
                model, sampler, x, cond, prompts, sde_mask, generator, noise, chunk, (latents, log_probs, a, b, std, ts),
                mixed_precision=mixed_precision, decode=decode, backend=backend, on_samples=on_samples)
            calls = n_steps

        def predict(x, t):
            v = torch.empty_like(x)
            for sl in _chunks(batch, chunk):
                with autocast_context(device, mixed_precision):
                    out = model.predict(x[sl], t[sl], select(cond, sl))
                v[sl] = out.to(x.dtype)
            return v

        prev = None  # the previous step's (x0, sigma): the 2M solver's history entering the tail
        for i in range(0 if samples is not None else n_steps if tail is None else tail):
            t = sampler.model_timesteps(i, batch).to(device)
            v = predict(x, t)
            calls += 1
            if tail is not None and i == tail - 1:
                prev = (sampler.x0(i, x, v), float(sampler.sigma(i)))
            if outputs is not None and bool(sde_mask[i]):
                outputs[:, i] = v.to(store)
            if bool(sde_mask[i]):
                c = sampler.coeffs(i, batch)
                if noise is not None:
                    eps = noise.step_noise(i, shape, device).to(x.dtype)
                    y, lp = sample_step(v, x, c.to(device), noise=eps, backend=backend)
                else:
                    y, lp = sample_step(v, x, c.to(device), generator=generator, backend=backend)
                log_probs[:, i] = lp.to(store)
            else:
                c = sampler.ode_coeffs(i, batch)
                y = sampler.ode_step(i, x, v)
            a[:, i], b[:, i], std[:, i] = c.a.to(store), c.b.to(store), c.std.to(store)
            ts[:, i] = t.to(store)
            if i == n_steps - 1 and decode == "x0":
                x = sampler.x0(i, x, v)  # DanceGRPO scores the last step's clean prediction
                latents[:, i + 1] = y.to(store)
            else:
                latents[:, i + 1] = y.to(store)
                x = y
        if tail is not None:
            states, x0, m = sampler.integrate_tail(tail, x, predict, prev=prev, compress=bool(sde_mask.any()))
            calls += m
            _, _, pos = sampler.tail_grid(tail, bool(sde_mask.any()))
            for k in range(tail + 1, n_steps + 1):  # each grid point: the latest tail state at or before it
                j = int((pos <= k + 1e-9).nonzero().max())
                latents[:, k] = states[j].to(store)
            for i in range(tail, n_steps):
                ts[:, i] = sampler.model_timesteps(i, batch).to(store)
            x = x0 if decode == "x0" else states[-1]
        if samples is None:
            samples = model.decode(x)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    if store_on_cpu:
        cond = {k: v.cpu() for k, v in cond.items()}
    return Rollout(latents, log_probs, a, b, std, ts, sde_mask.detach().cpu().clone(), cond, prompts, samples,
                   nfe=calls * batch, outputs=outputs)


def _collect_by_chunk(model, sampler, x, cond, prompts, sde_mask, generator, sample_noise, chunk, bufs, *,
                      mixed_precision, decode, backend, on_samples) -> torch.Tensor:
    """The rollout loop with chunks outer and steps inner, filling ``bufs`` (latents, log_probs,
    a, b, std, timesteps) as :func:`collect_rollout` does and calling ``on_samples`` per chunk.

    The noise is the synchronous loop's: with ``sample_noise`` (the trainer's per-sample noise)
    each sample's own draws, so both loops agree on every backend; otherwise each stochastic
    step's noise for the whole batch is drawn first, in step order, with ``torch.randn`` from
    ``generator`` (what the torch backend draws inside ``sample_step``; backends that draw in
    their kernel from a seed give another stream). Then each chunk takes its rows. The
    predictions are those of the synchronous loop's chunks of the same size.
    """
    latents, log_probs, a, b, std, ts = bufs
    store, device, batch, n_steps = latents.device, x.device, x.shape[0], sampler.num_steps

    def draw(i):
        if sample_noise is not None:
            return sample_noise.step_noise(i, x.shape[1:], device).to(store)
        return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(store)

    noise = [draw(i) if bool(sde_mask[i]) else None for i in range(n_steps)]
    parts = []
    for sl in _chunks(batch, chunk):
        xc, cc = x[sl], select(cond, sl)
        for i in range(n_steps):
            t = sampler.model_timesteps(i, batch).to(device)[sl]
            with autocast_context(device, mixed_precision):
                v = model.predict(xc, t, cc).to(xc.dtype)
            if bool(sde_mask[i]):
                c = sampler.coeffs(i, batch)[sl]
                eps = noise[i][sl].to(device=device, dtype=xc.dtype)
                y, lp = sample_step(v, xc, c.to(device), noise=eps, backend=backend)
                log_probs[sl, i] = lp.to(store)
            else:
                c = sampler.ode_coeffs(i, batch)[sl]
                y = sampler.ode_step(i, xc, v)
            a[sl, i], b[sl, i], std[sl, i] = c.a.to(store), c.b.to(store), c.std.to(store)
            ts[sl, i] = t.to(store)
            latents[sl, i + 1] = y.to(store)
            xc = sampler.x0(i, xc, v) if i == n_steps - 1 and decode == "x0" else y
        parts.append(model.decode(xc))
        on_samples(sl, parts[-1], prompts[sl])
    return torch.cat(parts)
