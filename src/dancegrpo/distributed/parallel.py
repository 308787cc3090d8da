"""Data-parallel updates over the ranks of a :class:`~dancegrpo.distributed.runtime.Runtime`.

Two strategies (``distributed.strategy``):

- ``ddp``: every rank holds the whole model; after the backward passes of an optimizer step the
  gradients are summed over the ranks (one all-reduce of a flat buffer). Each rank scales its
  loss by 1 / (the GLOBAL number of (sample, step) pairs of the optimizer step), so the sum is
  the one-process mean whatever share of the pairs each rank trained.
- ``fsdp``: FSDP2 (``fully_shard`` over a 1-D device mesh). Each transformer block is its own
  unit, then the denoiser as a whole; parameters, gradients and AdamW state live as shards
  (DTensors) and are gathered block by block for compute. Under ``mixed_precision=bf16`` the
  gathered parameters are bf16 and the gradient reduction fp32 (the shards, the fp32 master
  weights, stay fp32). The reduce-scatter sums (no 1/world factor) for the same reason as above.
  Every rank must run the same number of forwards (each one gathers parameters), so ranks with
  fewer samples in an optimizer step pad with zero-weight passes (``lockstep``).

Either way the gradient norm is the global one and clipping acts on it.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from .runtime import Runtime

__all__ = ["GradSync", "shard_policy", "fsdp_units", "denoiser_of", "broadcast_weights", "global_grad_norm",
           "clip_grads"]

log = logging.getLogger("dancegrpo.distributed")


def _is_dtensor(t) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    return mod is not None and isinstance(t, mod.DTensor)


class GradSync:
    """What the updater asks of the other ranks. With one process every method is the identity."""

    def __init__(self, rt: Runtime | None = None, params=(), lockstep: bool = False):
        self.rt = rt or Runtime()
        self.params = list(params)
        self.lockstep = bool(lockstep) and self.rt.distributed

    @property
    def distributed(self) -> bool:
        return self.rt.distributed

    def max_int(self, n: int) -> int:
        return int(self.rt.all_reduce(torch.tensor([n], dtype=torch.long), "max")) if self.distributed else n

    def all_true(self, flag: bool) -> bool:
        return bool(self.rt.all_reduce(torch.tensor([int(flag)], dtype=torch.long), "min")) if self.distributed \
            else flag

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        return self.rt.all_reduce(torch.tensor(values, dtype=torch.float64), "sum").tolist()

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum the replicated parameters' gradients over the ranks (FSDP reduces its own shards).
        A parameter with a gradient on some rank gets one everywhere (zeros where it had none),
        one that no rank touched keeps None, as with one process."""
        if not self.distributed:
            return
        plain = [p for p in self.params if not _is_dtensor(p)]
        if not plain:
            return
        has = self.rt.all_reduce(torch.tensor([p.grad is not None for p in plain], dtype=torch.long), "max")
        used = [p for p, h in zip(plain, has.tolist(), strict=True) if h]
        if not used:
            return
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1).float() for p in used])
        self.rt.all_reduce(flat, "sum")
        offset = 0
        for p in used:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


@torch.no_grad()
def global_grad_norm(params) -> torch.Tensor:
    """The 2-norm of every gradient of ``params`` over all ranks (shards included once)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g, dtype=torch.float32)
        norms.append(n.full_tensor() if _is_dtensor(n) else n)
    device = norms[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms])).cpu()


@torch.no_grad()
def clip_grads(params, max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients so their global norm is at most ``max_norm`` (torch's formula)."""
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


@torch.no_grad()
def broadcast_weights(model: nn.Module, rt: Runtime) -> None:
    """Rank 0's parameters and buffers on every rank (replicated ``ddp`` start)."""
    if not rt.distributed:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() or t.dtype in (torch.long, torch.int, torch.bool):
            torch.distributed.broadcast(t.data, src=0)


def denoiser_of(model: nn.Module) -> nn.Module:
    """The network ``predict`` runs (sharded as the FSDP root): the diffusers adapters'
    ``denoiser``, our DiT, else a ``net`` / ``transformer`` child, else the model itself. Text
    encoders and the VAE stay outside: ``encode_prompts`` / ``decode`` run them unsharded."""
    from ..models.dit import VideoDiT

    den = getattr(type(model), "denoiser", None)
    if isinstance(den, property):
        return model.denoiser
    if isinstance(model, VideoDiT):
        return model
    for name in ("dit", "transformer", "net"):
        child = getattr(model, name, None)
        if isinstance(child, nn.Module):
            return child
    dits = [m for m in model.modules() if isinstance(m, VideoDiT)]
    return dits[0] if dits else model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: the adapters' checkpointing units (FLUX double and single
    blocks, Wan / HunyuanVideo blocks) or our DiT's blocks."""
    from ..models.dit import VideoDiT

    units = getattr(model, "_checkpoint_units", None)
    if callable(units):
        return list(units())
    den = denoiser_of(model)
    if isinstance(den, VideoDiT):
        return list(den.blocks)
    return []


def _shard(model: nn.Module, mesh, mp_policy, offload: bool) -> nn.Module:
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        fully_shard,
        register_fsdp_forward_method,
    )

    kwargs = {"mesh": mesh, "mp_policy": mp_policy}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for unit in fsdp_units(model):
        fully_shard(unit, **kwargs)
    root = denoiser_of(model)
    fully_shard(root, **kwargs)
    if root is model:  # the trainer calls predict(), not forward(): gather around it too
        register_fsdp_forward_method(model, "predict")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


def shard_policy(model: nn.Module, ref_predict, rt: Runtime, mixed_precision: str, reference: str = "shard"):
    """FSDP2 over all ranks for the policy and (``reference="shard"``) the frozen KL copy; with
    ``reference="cpu"`` the copy stays whole on the CPU. Returns ``(model, ref_predict)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (rt.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    ref = getattr(ref_predict, "module", None)  # a full copy (no LoRA); LoRA's reference is the policy itself
    if ref is not None:
        if reference == "cpu":
            ref_predict = _on_cpu(ref_predict, ref, model)
        else:
            _shard(ref, mesh, mp, offload=False)
    _shard(model, mesh, mp, offload=False)
    log.info("FSDP2 over %d ranks: %d block units", rt.world_size, len(fsdp_units(model)))
    return model, ref_predict


def _on_cpu(ref_predict, ref: nn.Module, policy: nn.Module):
    ref.to("cpu")

    def predict_on_cpu(x, t, cond):
        ref.train(policy.training)
        with torch.no_grad():
            out = ref.predict(x.cpu(), t.cpu(), {k: v.cpu() for k, v in cond.items()})
        return out.to(x.device)
    predict_on_cpu.module = ref
    return predict_on_cpu
