"""The ``"torch"`` backend: the reference functions, run as they are (any device, fp64 too)."""

from __future__ import annotations

import torch

from . import reference as ref
from .dispatch import Backend


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda", "mps", "xpu")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def step_logprob(self, v, x, y, v_ref, a, b, std, reduction):
        return ref.step_logprob_ref(v, x, y, a, b, std, reduction=reduction, v_ref=v_ref)

    def sample_step(self, v, x, noise, generator, a, b, std, reduction):
        with torch.no_grad():
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            return ref.sample_step_ref(v, x, noise, a, b, std, reduction=reduction)

    def group_advantages(self, rewards, weights, group_size, std, unbiased, eps, clip, aggregate, drop_nonfinite):
        return ref.group_advantages_ref(rewards, weights, group_size, std=std, unbiased=unbiased, eps=eps,
                                        clip=clip, aggregate=aggregate, drop_nonfinite=drop_nonfinite)

    def clipped_ratio_loss(self, logp, old_logp, adv, ref_logp, clip_low, clip_high, beta, reduction):
        return ref.clipped_ratio_loss_ref(logp, old_logp, adv, clip_low=clip_low, clip_high=clip_high,
                                          ref_logp=ref_logp, beta=beta, reduction=reduction)


    def nft_loss(self, v, v_old, target, r, t, beta, eps, adaptive):
        return ref.nft_loss_ref(v, v_old, target, r, t, beta=beta, eps=eps,
                                weighting="adaptive" if adaptive else "none")


BACKEND = TorchBackend()
