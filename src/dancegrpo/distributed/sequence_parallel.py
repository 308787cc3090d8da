"""Ulysses sequence parallelism: one sample's video tokens split over the k ranks of a group.

Each rank holds N/k tokens between attentions. Around every self-attention an all-to-all
trades the split: scatter heads, gather sequence, so a rank holds all N tokens for H/k heads,
runs ordinary (exact) attention for those heads, and the inverse all-to-all returns its own
N/k tokens with all H heads. Everything else in a block (norms, MLPs, projections, cross-
attention to the replicated text) is per token and needs no communication. Per layer a rank
sends and receives 2 x 4 x (k-1)/k x (N/k) x hidden elements (q, k, v in, output back);
docs/distributed_scaling.md has the numbers.

Padding: N is padded to a multiple of k with zero tokens, which are masked out as keys of
every attention and dropped at the output, so the result equals the unsplit model exactly
(up to reduction order). H must be divisible by k.

Gradients follow one convention: a tensor that every rank of the group computes identically
(text embeddings, the conditioning, parameters) carries on each rank only the part of its
gradient that flows through that rank's tokens or heads. Summing over the group gives the
true gradient, so parameter gradients (and gradients of the replicated inputs) must be
all-reduced with SUM over the group (``all_reduce_grads``). The model's output is gathered
on every rank; the gradient arriving at it must be the same on every rank (one loss computed
identically everywhere), and each rank takes its own tokens' slice of it.

Diffusers transformers that ship a context-parallel plan (``_cp_plan``: Wan, and in diffusers
0.42 also FLUX, Qwen-Image, LTX...) use diffusers' own Ulysses attention
(``enable_diffusers_sequence_parallel``); its gradients follow the same convention.

Under data parallelism over W ranks of which groups of k share a sample, a gradient average
over all W ranks (DDP, FSDP) gives 1/k of the data-parallel mean: scale the loss by k.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["SequenceParallel", "TokenShard", "all_to_all", "all_reduce_grads", "sequence_parallel_group",
           "apply_sequence_parallel", "enable_diffusers_sequence_parallel"]


def _world(group) -> int:
    return dist.get_world_size(group)


def _a2a(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` in k chunks along scatter_dim, send chunk j to rank j, concatenate what
    arrives (rank order) along gather_dim."""
    k = _world(group)
    send = torch.stack(x.chunk(k, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    # An all-to-all only moves data between ranks; its backward moves the gradients back
    # along the same routes, which is the inverse all-to-all.
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _a2a(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _a2a(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Differentiable all-to-all over ``group``: x's scatter_dim must be divisible by its size."""
    if x.shape[scatter_dim] % _world(group):
        raise ValueError(f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible "
                         f"by the group size {_world(group)}")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherReplicatedGrad(torch.autograd.Function):
    """All-gather whose output feeds a loss computed identically on every rank: the incoming
    gradient is already whole on each rank, so backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group, ctx.n = dim, group, x.shape[dim]
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        r = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, r * ctx.n, ctx.n).contiguous(), None, None


class _GatherPartialGrad(_GatherReplicatedGrad):
    """All-gather whose output feeds replicated computation inside the model: each rank's
    gradient is partial, so backward sums them over the group and keeps this rank's slice
    (a reduce-scatter, written as all-reduce + slice because gloo has no reduce-scatter)."""

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return _GatherReplicatedGrad.backward(ctx, grad)


class TokenShard:
    """One forward's split of ``n`` tokens over the group: padded to ``padded`` (a multiple of
    k), this rank holds tokens [start, start + local). Built by ``SequenceParallel.shard``."""

    def __init__(self, sp: SequenceParallel, n: int):
        self.sp, self.group, self.k, self.rank = sp, sp.group, sp.size, sp.rank
        self.n = n
        self.local = -(-n // self.k)
        self.padded = self.local * self.k
        self.start = self.rank * self.local

    def split(self, x: torch.Tensor, dim: int = 1, fill: float | complex = 0) -> torch.Tensor:
        """This rank's tokens of ``x`` (``n`` along dim), padding with ``fill``. The backward of
        a slice leaves zeros outside it: the partial-gradient convention."""
        if self.padded > self.n:
            pad_shape = list(x.shape)
            pad_shape[dim] = self.padded - self.n
            x = torch.cat([x, x.new_full(pad_shape, fill)], dim=dim)
        return x.narrow(dim, self.start, self.local)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence (padding dropped) on every rank, from each rank's ``local`` tokens."""
        return _GatherReplicatedGrad.apply(x, dim, self.group).narrow(dim, 0, self.n)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, local, H, D) -> (B, padded, H/k, D): all tokens, this rank's heads."""
        return _AllToAll.apply(x, 2, 1, self.group)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, padded, H/k, D) -> (B, local, H, D): the inverse of ``to_heads``."""
        return _AllToAll.apply(x, 1, 2, self.group)

    def head_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a replicated (B, L, H, D) tensor (the text stream)."""
        h = x.shape[2] // self.k
        return x.narrow(2, self.rank * h, h)

    def gather_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H/k, D) per rank -> (B, L, H, D) on every rank, for replicated use."""
        return _GatherPartialGrad.apply(x, 2, self.group)

    def key_mask(self, batch: int, device) -> torch.Tensor | None:
        """(B, padded) bool, False on the padding tokens; None when there is none."""
        if self.padded == self.n:
            return None
        return (torch.arange(self.padded, device=device) < self.n).expand(batch, -1)


class SequenceParallel:
    """The process group a model's sequence is split over (a handle: rank, size, group)."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallel: torch.distributed is not initialised "
                               "(start with torchrun, or call init_process_group first)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def check_heads(self, num_heads: int, where: str) -> None:
        if num_heads % self.size:
            raise ValueError(f"{where}: num_heads ({num_heads}) must be divisible by the "
                             f"sequence-parallel degree ({self.size})")

    def shard(self, n_tokens: int) -> TokenShard:
        return TokenShard(self, n_tokens)

    def __repr__(self):
        return f"SequenceParallel(rank={self.rank}, size={self.size})"

    def __deepcopy__(self, memo):
        # A handle to a communicator: a copied model (EMA, KL reference) shares it.
        return self


_GROUPS: dict = {}  # (kind, k, world, default group) -> this rank's group or mesh, made once


def sequence_parallel_group(k: int):
    """Split the world into consecutive groups of k ranks ([0..k-1], [k..2k-1], ...) and return
    this rank's group (torchrun numbers a node's processes consecutively, so a group stays on
    one node when k divides the processes per node). Every rank must call it (``new_group`` is
    collective); later calls return the same group."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or world % k:
        raise ValueError(f"sequence_parallel must be a positive int dividing the number of processes "
                         f"({world}), got {k!r}")
    key = ("group", k, world, id(dist.group.WORLD))  # a re-initialised world gets new groups
    if key not in _GROUPS:
        for first in range(0, world, k):
            g = dist.new_group(list(range(first, first + k)))
            if first <= rank < first + k:
                _GROUPS[key] = g
    return _GROUPS[key]


def all_reduce_grads(params, group=None) -> None:
    """Sum the partial gradients of ``params`` over the sequence-parallel group (one flat
    buffer per dtype, so one collective per dtype instead of one per tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _sp_mesh(k: int):
    """A (world / k, 1, k) device mesh whose "ulysses" rows are ``sequence_parallel_group``'s
    groups (consecutive ranks), the layout diffusers' context parallelism reads."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    key = ("mesh", k, world, id(dist.group.WORLD))
    if key not in _GROUPS:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _GROUPS[key] = init_device_mesh(device, (world // k, 1, k), mesh_dim_names=("sp_replicas", "ring", "ulysses"))
    return _GROUPS[key]


def enable_diffusers_sequence_parallel(transformer, k: int, mesh=None) -> None:
    """Ulysses sequence parallelism of degree k for a diffusers transformer with a
    context-parallel plan, through ``enable_parallelism(ContextParallelConfig(ulysses_degree=k))``.

    The video token count of every forward must be divisible by k (checked before each forward:
    diffusers' uneven mode needs uneven all-gathers, which gloo lacks). mesh: a DeviceMesh with
    "ring" (size 1) and "ulysses" (size k) dimensions; default ``_sp_mesh(k)``.
    """
    from diffusers import ContextParallelConfig

    name = type(transformer).__name__
    if getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"sequence_parallel: {name} has no context-parallel plan in this diffusers "
                         "version; sequence parallelism supports our VideoDiT and diffusers models with one (Wan)")
    heads = transformer.config.num_attention_heads
    if heads % k:
        raise ValueError(f"sequence_parallel: {name} has {heads} attention heads, not divisible by the "
                         f"sequence-parallel degree {k}")
    patch = tuple(transformer.config.patch_size)

    def check_tokens(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        n = 1
        for size, p in zip(x.shape[2:], patch, strict=True):
            n *= size // p
        if n % k:
            raise ValueError(f"sequence_parallel: {name} gets {n} video tokens per sample, not divisible by "
                             f"the sequence-parallel degree {k} (choose frames / size so that it is)")

    config = ContextParallelConfig(ulysses_degree=k, mesh=mesh if mesh is not None else _sp_mesh(k))
    if torch.accelerator.device_count() == 0:
        # diffusers 0.42 picks the rank's device as rank % torch.accelerator.device_count(),
        # a division by zero on a CPU-only machine; the device it records is unused on CPU.
        real = torch.accelerator.device_count
        torch.accelerator.device_count = lambda: 1
        try:
            transformer.enable_parallelism(config=config)
        finally:
            torch.accelerator.device_count = real
    else:
        transformer.enable_parallelism(config=config)
    transformer.register_forward_pre_hook(check_tokens, with_kwargs=True)


def apply_sequence_parallel(model, k: int, group=None) -> int:
    """Turn on sequence parallelism of degree k in every transformer inside ``model``: our
    ``VideoDiT`` (``set_sequence_parallel(group)``; default group: ``sequence_parallel_group(k)``)
    and diffusers transformers with a context-parallel plan. Returns how many were found; a
    model with none raises (sequence_parallel > 1 would otherwise silently do nothing)."""
    if k == 1:
        return 0
    from ..models.dit import VideoDiT

    found = 0
    for m in list(model.modules()):
        if isinstance(m, VideoDiT):
            if group is None:
                group = sequence_parallel_group(k)
            m.set_sequence_parallel(group)
            found += 1
        elif hasattr(m, "enable_parallelism") and getattr(getattr(m, "config", None), "num_attention_heads", None):
            # a diffusers transformer (VAEs and text encoders have no attention-head config here)
            enable_diffusers_sequence_parallel(m, k)
            found += 1
    if not found:
        raise ValueError(f"sequence_parallel: {type(model).__name__} contains no transformer that supports "
                         "sequence parallelism (our VideoDiT, or a diffusers model with a context-parallel plan)")
    return found
