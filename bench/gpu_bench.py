"""GPU benchmark: time, bytes moved, achieved GB/s and fraction of copy bandwidth per op and backend.

    python bench/gpu_bench.py [--out bench/results/<device>.json] [--batch 8]

For each op and backend (plus the eager reference and torch.compile of it) on the video latent
(8 x 16 x 21 x 60 x 104 by default; bf16 model output, fp32 latents): the median time from
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs), the bytes the op must move
at minimum (each input read once, each output written once), the achieved GB/s, and that as a
fraction of the measured device-to-device copy bandwidth (the physical limit of these
memory-bound ops). Peak extra memory of grpo_step_loss forward+backward is reported against the
size of one gradient. Results are written as JSON with the device name, versions and date.
Needs a CUDA GPU; it refuses to run without one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch


def copy_bandwidth(numel=1 << 28):
    import triton.testing

    src = torch.empty(numel, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    import triton
    import triton.testing

    import dancegrpo as dg
    from dancegrpo.ops import dispatch
    from dancegrpo.ops import reference as ref

    shape = (args.batch, 16, 21, 60, 104)
    n = 1
    for s in shape:
        n *= s
    B = shape[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn(shape, device="cuda", generator=g).bfloat16().requires_grad_(True)
    x = torch.randn(shape, device="cuda", generator=g)
    y = torch.randn(shape, device="cuda", generator=g)
    noise = torch.randn(shape, device="cuda", generator=g)
    c = dg.flow_sde_coeffs(torch.linspace(0.9, 0.5, B), torch.linspace(0.85, 0.45, B), 0.3).to("cuda")
    a, b, s = c.expand(B, torch.device("cuda"))
    old = dg.step_logprob(v, x, y, c, backend="torch").detach()
    adv = torch.randn(B, device="cuda")
    v_ref = (v.detach().float() + 0.01).bfloat16()
    bw = copy_bandwidth()

    # Minimum bytes: v bf16 (2), x fp32 (4), y / noise fp32 (4), grad bf16 (2).
    bytes_moved = {
        "step_logprob_fwd": n * (2 + 4 + 4),
        "step_logprob_fwd_bwd": n * (2 + 4 + 4) * 2 + n * 2,
        "sample_step": n * (2 + 4 + 4 + 4),
        "sample_step_rng": n * (2 + 4 + 4),
        "grpo_step_loss_fwd_bwd": n * (2 + 2 + 4 + 4) * 2 + n * 2,
    }
    ref_lp = torch.compile(lambda v, x, y, a, b, s: ref.step_logprob_ref(v, x, y, a, b, s)[0])
    ref_sample = torch.compile(lambda v, x, nz, a, b, s: ref.sample_step_ref(v, x, nz, a, b, s))

    def fwd_bwd(fn):
        def run():
            v.grad = None
            fn().sum().backward()
        return run

    cases = {}
    for name in ("torch", "native", "triton"):
        if dispatch.get_backend(name).not_supported_reasons("step_logprob", [x]):
            continue
        cases[(name, "step_logprob_fwd")] = lambda name=name: dg.step_logprob(v.detach(), x, y, c, backend=name)
        cases[(name, "step_logprob_fwd_bwd")] = fwd_bwd(lambda name=name: dg.step_logprob(v, x, y, c, backend=name))
        cases[(name, "sample_step")] = lambda name=name: dg.sample_step(v.detach(), x, c, noise=noise, backend=name)
        cases[(name, "sample_step_rng")] = lambda name=name: dg.sample_step(v.detach(), x, c, backend=name)
        cases[(name, "grpo_step_loss_fwd_bwd")] = fwd_bwd(lambda name=name: dg.grpo_step_loss(
            v, x, y, c, old, adv, ref_model_output=v_ref, beta=0.01, backend=name)[0])
    cases[("torch.compile", "step_logprob_fwd")] = lambda: ref_lp(v.detach(), x, y, a, b, s)
    cases[("torch.compile", "step_logprob_fwd_bwd")] = fwd_bwd(lambda: ref_lp(v, x, y, a, b, s))
    cases[("torch.compile", "sample_step")] = lambda: ref_sample(v.detach(), x, noise, a, b, s)

    rows = []
    for (backend, op), fn in cases.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        gbs = bytes_moved[op] / (ms * 1e-3) / 1e9
        row = dict(op=op, backend=backend, median_ms=ms, bytes=bytes_moved[op], gb_per_s=gbs,
                   fraction_of_copy_bw=gbs / bw)
        if op == "grpo_step_loss_fwd_bwd":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
            row["gradient_bytes"] = v.numel() * v.element_size()
        rows.append(row)
        print(f"{op:<24} {backend:<14} {ms:8.3f} ms {gbs:8.1f} GB/s {gbs / bw:6.1%}")

    result = dict(
        device=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
        torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
        python=platform.python_version(), shape=list(shape), copy_bandwidth_gb_per_s=bw, rows=rows,
    )
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   torch.cuda.get_device_name(0).replace(" ", "_") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"copy bandwidth {bw:.0f} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
