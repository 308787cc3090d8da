"""pytest-benchmark of the GRPO ops per backend against the reference and torch.compile of it.

Every timed call ends with a device synchronisation. Modes: forward, backward (backward alone,
the forward re-run in the untimed setup), full (forward + backward), and the rollout step.
Peak extra memory (CUDA only) goes into ``extra_info``.
"""

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import reference as ref

from .conftest import SHAPES, bench_device, compiled_backends, sync

BACKENDS = compiled_backends()
_compiled = {}


def _inputs(kind):
    device = bench_device()
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = SHAPES[kind]
    v = torch.randn(shape, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    x = torch.randn(shape, generator=g).to(device)
    y = torch.randn(shape, generator=g).to(device)
    B = shape[0]
    c = dg.StepCoeffs(torch.rand(B, generator=g) + 0.5, -torch.rand(B, generator=g) * 0.1,
                      torch.rand(B, generator=g) * 0.3 + 0.2).to(device)
    return v, x, y, c


def _logprob_fn(backend):
    if backend != "torch.compile":
        return lambda v, x, y, c: dg.step_logprob(v, x, y, c, backend=backend)
    if "logprob" not in _compiled:
        fn = torch.compile(lambda v, x, y, a, b, s: ref.step_logprob_ref(v, x, y, a, b, s)[0], dynamic=False)
        _compiled["logprob"] = fn
    fn = _compiled["logprob"]
    return lambda v, x, y, c: fn(v, x, y, *c.expand(v.shape[0], v.device))


def _sample_fn(backend):
    if backend != "torch.compile":
        return lambda v, x, n, c: dg.sample_step(v, x, c, noise=n, backend=backend)
    if "sample" not in _compiled:
        _compiled["sample"] = torch.compile(lambda v, x, n, a, b, s: ref.sample_step_ref(v, x, n, a, b, s),
                                            dynamic=False)
    fn = _compiled["sample"]
    return lambda v, x, n, c: fn(v, x, n, *c.expand(v.shape[0], v.device))


def _peak(device, fn):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
def test_step_logprob(benchmark, backend, mode, shape):
    v, x, y, c = _inputs(shape)
    f = _logprob_fn(backend)
    device = v.device
    benchmark.group = f"step_logprob-{mode}-{shape}"
    benchmark.extra_info.update(shape=list(v.shape), backend=backend, device=str(device))

    if mode == "forward":
        def run():
            with torch.no_grad():
                f(v, x, y, c)
            sync(device)
        run()
        benchmark.extra_info["peak_extra_mib"] = _peak(device, run)
        benchmark(run)
    elif mode == "full":
        def run():
            v.grad = None
            f(v, x, y, c).sum().backward()
            sync(device)
        run()
        benchmark.extra_info["peak_extra_mib"] = _peak(device, run)
        benchmark(run)
    else:
        def setup():
            v.grad = None
            out = f(v, x, y, c).sum()
            sync(device)
            return (out,), {}

        def run(out):
            out.backward()
            sync(device)
        run(*setup()[0])
        benchmark.pedantic(run, setup=setup, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_step(benchmark, backend, shape):
    v, x, _, c = _inputs(shape)
    v = v.detach()
    noise = torch.randn_like(x)
    f = _sample_fn(backend)
    device = v.device
    benchmark.group = f"sample_step-{shape}"
    benchmark.extra_info.update(shape=list(v.shape), backend=backend, device=str(device))

    def run():
        with torch.no_grad():
            f(v, x, noise, c)
        sync(device)
    run()
    benchmark.extra_info["peak_extra_mib"] = _peak(device, run)
    benchmark(run)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch.compile"])
def test_grpo_step_loss_full(benchmark, backend, shape):
    """The drop-in loss, forward + backward, with a KL to a reference output."""
    v, x, y, c = _inputs(shape)
    v_ref = v.detach() + 0.01
    with torch.no_grad():
        old = dg.step_logprob(v, x, y, c, backend="torch")
    adv = torch.randn(v.shape[0], device=v.device)
    device = v.device
    benchmark.group = f"grpo_step_loss-full-{shape}"
    benchmark.extra_info.update(shape=list(v.shape), backend=backend, device=str(device))

    def run():
        v.grad = None
        loss, _ = dg.grpo_step_loss(v, x, y, c, old, adv, ref_model_output=v_ref, beta=0.01, backend=backend)
        loss.backward()
        sync(device)
    run()
    benchmark.extra_info["peak_extra_mib"] = _peak(device, run)
    benchmark(run)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch.compile"])
def test_small_ops(benchmark, backend):
    """Launch-bound ops on a realistic batch: 16 prompts x 12 samples, 2 rewards."""
    device = bench_device()
    rewards = torch.randn(192, 2, device=device)
    logp = torch.randn(192, device=device, requires_grad=True)
    old = logp.detach() + 1e-3 * torch.randn(192, device=device)
    benchmark.group = "advantages+loss"
    benchmark.extra_info.update(backend=backend, device=str(device))

    def run():
        adv = dg.group_advantages(rewards, 12, weights=[0.7, 0.3], backend=backend)
        loss, _ = dg.clipped_ratio_loss(logp, old, adv, backend=backend)
        loss.backward()
        sync(device)
    run()
    benchmark(run)


def _nft_fn(backend):
    """DiffusionNFT's loss: the public op per backend, or torch.compile of the reference."""
    if backend != "torch.compile":
        return lambda v, o, g, r, t: dg.nft_loss(v, o, g, r, t, beta=1.0, backend=backend)[0]
    if "nft" not in _compiled:
        _compiled["nft"] = torch.compile(lambda v, o, g, r, t: ref.nft_loss_ref(v, o, g, r, t, beta=1.0)[0].mean(),
                                         dynamic=False)
    return _compiled["nft"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nft_loss_full(benchmark, backend, shape):
    """nft_loss forward + backward: bf16 v, bf16 old-policy output, fp32 target."""
    v, x, y, _ = _inputs(shape)
    v_old = (v.detach().float() + 0.05 * x).to(v.dtype)
    B, device = v.shape[0], v.device
    g = torch.Generator(device="cpu").manual_seed(1)
    r, t = torch.rand(B, generator=g).to(device), (0.1 + 0.8 * torch.rand(B, generator=g)).to(device)
    f = _nft_fn(backend)
    benchmark.group = f"nft_loss-full-{shape}"
    benchmark.extra_info.update(shape=list(v.shape), backend=backend, device=str(device))

    def run():
        v.grad = None
        f(v, v_old, y, r, t).backward()
        sync(device)
    run()
    benchmark.extra_info["peak_extra_mib"] = _peak(device, run)
    benchmark(run)
