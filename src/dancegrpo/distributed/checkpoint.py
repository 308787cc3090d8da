"""A run's training state through ``torch.distributed.checkpoint`` (DCP), for any number of processes.

The same calls serve a plain module in one process (no process group), a DDP-wrapped module and an
FSDP2 (``fully_shard``) module: ``get_state_dict`` names every tensor by its unwrapped name (no DDP
``module.`` prefix) and leaves FSDP's parameters and optimizer moments as sharded DTensors, so each
rank writes only its shard and a checkpoint loads on any number of processes (DCP reshards).

Functions that say *collective* must be called by every rank in the same order.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["rank_and_world", "all_gather_objects", "broadcast_object", "save_training_state",
           "load_training_state", "full_model_state", "full_tensors", "shard_files"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if _initialized() else (0, 1)


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (collective; ``[obj]`` in one process)."""
    if not _initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (collective)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes a single process' whenever no process group exists; here that is
    the intended one-process run, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _options(trainable_only: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # trainable_only (LoRA): the frozen base is rebuilt from its pretrained weights, never saved.
    kw.setdefault("strict", not trainable_only)
    return StateDictOptions(ignore_frozen_params=trainable_only, **kw)


def _training_state(model: nn.Module, optimizer, trainable_only: bool, ema: dict | None, saving: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    fresh = not optimizer.state
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(trainable_only))
    if fresh and saving:
        # get_state_dict fills an empty optimizer's state by a zero-lr step (step=1, zero moments);
        # kept, that would change the next real step's bias correction. Undo it: no state is saved.
        optimizer.state.clear()
        optim_state["state"] = {}
    state = {"model": model_state, "optimizer": optim_state}
    if ema is not None:
        state["ema"] = dict(ema)  # the live shadow tensors: DCP loads into them in place
    return state


def save_training_state(directory, model: nn.Module, optimizer, *, trainable_only: bool = False,
                        ema: dict | None = None) -> None:
    """Write model, optimizer (and EMA shadow) state into ``directory`` as a DCP checkpoint: each
    rank its own shard file, rank 0 the ``.metadata`` (collective). Files are fsynced."""
    import torch.distributed.checkpoint as dcp

    state = _training_state(model, optimizer, trainable_only, ema, saving=True)
    with _quiet_single_process():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory), sync_files=True), no_dist=not _initialized())


def load_training_state(directory, model: nn.Module, optimizer, *, trainable_only: bool = False,
                        ema: dict | None = None) -> None:
    """Load what :func:`save_training_state` wrote, on any number of processes (collective).

    Every tensor the model/optimizer/EMA expect must be in the checkpoint with its global shape
    (DCP raises otherwise); each rank reads only the pieces of its own shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = _training_state(model, optimizer, trainable_only, ema, saving=False)
    reader = dcp.FileSystemReader(str(directory))
    saved = reader.read_metadata().state_dict_metadata
    # parameters that had no optimizer state when saved (no step yet, or never a gradient) get none
    state["optimizer"]["state"] = {n: v for n, v in state["optimizer"]["state"].items()
                                   if f"optimizer.state.{n}.step" in saved}
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, no_dist=not _initialized())
    set_model_state_dict(model, state["model"], options=_options(trainable_only))
    # not strict: the parameters left out above stay without state
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_options(trainable_only, strict=False))


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def full_model_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on CPU on rank 0, ``{}`` on the other ranks (collective
    under FSDP: the shards are all-gathered one tensor at a time).

    trainable_only: only the parameters that train (LoRA adapters), else every parameter and buffer,
    i.e. the same keys as the unwrapped module's ``state_dict()``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(trainable_only, full_state_dict=True, cpu_offload=True))
    if rank_and_world()[0] != 0:
        return {}
    if trainable_only:  # ignore_frozen_params keeps buffers; the adapters alone are the export
        trains = {n for n, p in _unwrap(model).named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trains}
    return state


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor gathered whole, on CPU on rank 0 (``{}`` elsewhere; collective
    when any tensor is a DTensor)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.detach().cpu()
    return out if rank_and_world()[0] == 0 else {}


def shard_files(directory, rank: int) -> list[Path]:
    """The DCP data files rank ``rank`` wrote (``__<rank>_<n>.distcp``) in ``directory``."""
    return sorted(Path(directory).glob(f"__{rank}_*.distcp"))
