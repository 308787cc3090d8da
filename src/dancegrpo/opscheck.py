"""Run every op through every available backend on a realistic latent, check it against the
float64 reference and time it: ``python -m dancegrpo.opscheck [--shape 2,16,21,60,104]``.

This is the first part of ``make demo`` and a quick health check for a new machine.
"""

from __future__ import annotations

import argparse
import time

import torch

import dancegrpo as dg
from dancegrpo.ops import dispatch

VIDEO_LATENT = (2, 16, 21, 60, 104)


def _time(fn, device, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run(shape=VIDEO_LATENT, device=None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=g).to(device, torch.bfloat16)
    x = torch.randn(shape, generator=g).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    B = shape[0]
    sigma = torch.linspace(0.9, 0.5, B)
    c = dg.flow_sde_coeffs(sigma, sigma - 0.05, 0.3).to(device)
    with torch.no_grad():
        y_ref, logp_ref = dg.sample_step(v.double(), x.double(), c, noise=noise.double(), backend="torch")
    v64 = v.double().requires_grad_(True)
    dg.step_logprob(v64, x.double(), y_ref.float().double(), c, backend="torch").sum().backward()
    y = y_ref.float()
    # DiffusionNFT's loss on the same latent: v against a nearby old-policy output, target noise - x.
    v_old = (v.float() + 0.05 * noise).to(torch.bfloat16)
    r, t = torch.rand(B, generator=g).to(device), (0.1 + 0.8 * torch.rand(B, generator=g)).to(device)
    v64n = v.double().requires_grad_(True)
    dg.nft_loss(v64n, v_old.double(), (noise - x).double(), r, t, backend="torch")[0].backward()
    rows = []
    for name, reasons in dispatch.availability(device.type).items():
        if reasons:
            rows.append(dict(backend=name, status="unavailable: " + "; ".join(reasons)))
            continue
        _, logp = dg.sample_step(v, x, c, noise=noise, backend=name)
        vg = v.clone().requires_grad_(True)

        def full():
            vg.grad = None
            dg.step_logprob(vg, x, y, c, backend=name).sum().backward()

        def nft():
            vg.grad = None
            dg.nft_loss(vg, v_old, noise - x, r, t, backend=name)[0].backward()

        nft()
        nft_grad_err = float((vg.grad.double() - v64n.grad).abs().max() / v64n.grad.abs().max())
        full()
        lp = dg.step_logprob(vg, x, y, c, backend=name).detach()
        rows.append(dict(
            backend=name, status="ok",
            sample_ms=1e3 * _time(lambda: dg.sample_step(v, x, c, noise=noise, backend=name), device),
            full_ms=1e3 * _time(full, device),
            logp_err=float((lp.double() - logp_ref).abs().max()),
            sample_logp_err=float((logp.double() - logp_ref).abs().max()),
            grad_rel_err=float((vg.grad.double() - v64.grad).abs().max() / v64.grad.abs().max()),
            nft_ms=1e3 * _time(nft, device), nft_grad_rel_err=nft_grad_err,
        ))
    return rows


def format_table(rows, shape) -> str:
    out = [f"GRPO ops on a latent of shape {tuple(shape)} (bf16 model output, fp32 latents), "
           "checked against the float64 reference:",
           f"{'backend':<8} {'sample_step':>12} {'logprob fwd+bwd':>16} {'max|dlogp|':>11} {'grad rel err':>13} "
           f"{'nft_loss fwd+bwd':>17} {'nft grad err':>13}"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"{r['backend']:<8} {r['status']}")
            continue
        out.append(f"{r['backend']:<8} {r['sample_ms']:>10.1f}ms {r['full_ms']:>14.1f}ms "
                   f"{max(r['logp_err'], r['sample_logp_err']):>11.2e} {r['grad_rel_err']:>13.2e} "
                   f"{r['nft_ms']:>15.1f}ms {r['nft_grad_rel_err']:>13.2e}")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default=",".join(map(str, VIDEO_LATENT)))
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    print(format_table(run(shape, args.device), shape))


if __name__ == "__main__":
    main()
