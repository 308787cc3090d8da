"""Benchmarks: `pytest bench/ --benchmark-only` (CPU, or the GPU when one is present).

Shapes: an image latent 8x16x128x128 and a video latent 2x16x21x60x104
(DANCEGRPO_BENCH_VIDEO_BATCH=8 for the GPU target shape). model_output bf16, latents fp32.
"""

import os

import pytest
import torch

SHAPES = {
    "image": (8, 16, 128, 128),
    "video": (int(os.environ.get("DANCEGRPO_BENCH_VIDEO_BATCH", "2")), 16, 21, 60, 104),
}


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compiled_backends():
    """Backends that can run here, plus the reference and torch.compile of the reference."""
    from dancegrpo.ops import dispatch

    device = bench_device()
    names = ["torch", "torch.compile"]
    for name in ("native", "triton"):
        b = dispatch.get_backend(name)
        if not b.not_supported_reasons("step_logprob", [torch.empty(1, device=device)]):
            names.append(name)
    return names


@pytest.fixture(params=list(SHAPES))
def shape(request):
    return request.param
