"""The process group of a run: joining it from torchrun's environment, rank / world, the
collectives the trainer needs, and turning a lost peer into one clear error.

``setup(cfg.distributed, cfg.device)`` returns ``(Runtime, device)``:

- a process group that already exists (a test that spawned its ranks) is used as it is;
- else ``WORLD_SIZE > 1`` in the environment (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT) joins one: backend ``auto`` is nccl on CUDA and gloo on CPU, the
  device is ``cuda:LOCAL_RANK`` (or the CPU), collectives time out after ``timeout_s``;
- else a one-process :class:`Runtime` whose collectives are the identity: a run without
  torchrun never touches ``torch.distributed``.

Ranks ``r`` with the same ``r // sequence_parallel`` form one data-parallel slot: they make the
same samples and split each one's tokens.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DeviceError, UserError

__all__ = ["Runtime", "setup", "DistributedError", "maybe_inject_fault", "FAULT_ENV", "describe_failure",
           "is_collective_failure"]

# Fault injection for the failure tests: "RANK@STEP" makes that rank exit abruptly (no clean-up,
# as a crashed or OOM-killed process would) when it reaches that training step.
FAULT_ENV = "DANCEGRPO_FAULT_KILL"

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(UserError, RuntimeError):
    """A peer process died or a collective timed out: the run cannot continue."""


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sequence_parallel: int = 1
    timeout_s: float = 600.0
    owns_group: bool = False  # this run created the process group and destroys it at the end
    comm_device: str = "cpu"  # where collectives' tensors must live (cuda under nccl)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sequence_parallel

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sequence_parallel

    # ------------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over every rank (``sum`` | ``max`` | ``min``); returns ``tensor``."""
        if self.distributed:
            ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
                   "min": torch.distributed.ReduceOp.MIN}
            t = tensor.to(self.comm_device)
            torch.distributed.all_reduce(t, op=ops[op])
            tensor.copy_(t)
        return tensor

    def gather_samples(self, tensor: torch.Tensor) -> torch.Tensor:
        """The data-parallel slots' (equal-sized) slices concatenated in rank order along dim 0;
        the copies of sequence-parallel peers are left out."""
        if not self.distributed:
            return tensor
        t = tensor.to(self.comm_device).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t)
        return torch.cat(parts[:: self.sequence_parallel]).to(tensor.device)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer (torchrun sets it), got {value!r}") from None


def _device(device_name: str, local_rank: int) -> torch.device:
    if device_name in ("auto", "cuda") or device_name.startswith("cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise DeviceError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                                  "device(s): start at most that many processes per node (--nproc_per_node)")
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
        if device_name != "auto":
            raise DeviceError(f"device={device_name} but CUDA is not available here; use device=cpu or device=auto")
    if device_name not in ("auto", "cpu"):
        raise DeviceError(f"device={device_name}: a multi-process run uses cuda:LOCAL_RANK or cpu")
    return torch.device("cpu")


def setup(dcfg, device_name: str) -> tuple[Runtime, torch.device | None]:
    """Join (or find) the process group. Returns the runtime and the device this rank computes
    on (None for one process: the caller resolves ``device`` as usual)."""
    sp = int(dcfg.sequence_parallel)
    dist_ok = torch.distributed.is_available()
    if dist_ok and torch.distributed.is_initialized():
        rt = Runtime(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", torch.distributed.get_rank())), sp, dcfg.timeout_s, False)
        device = _device(device_name, rt.local_rank)
    elif int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun "
                              "(docs/distributed.md)")
        if not dist_ok:
            raise DeviceError("this torch build has no torch.distributed: a multi-process run is not possible")
        rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
        device = _device(device_name, local)
        backend = dcfg.backend if dcfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed.backend=nccl needs CUDA devices; use backend=gloo (or auto) on CPU")
        torch.distributed.init_process_group(backend, rank=rank, world_size=world,
                                             timeout=datetime.timedelta(seconds=dcfg.timeout_s),
                                             device_id=device if device.type == "cuda" else None)
        rt = Runtime(rank, world, local, sp, dcfg.timeout_s, True)
        atexit.register(rt.close)  # also when the run fails before its end
        if rank != 0:  # rank 0 speaks for the run; the others only warn
            logging.getLogger("dancegrpo").setLevel(logging.WARNING)
    else:
        if sp > 1:
            raise ConfigError(f"distributed.sequence_parallel={sp} needs that many processes: launch with torchrun")
        return Runtime(timeout_s=dcfg.timeout_s), None
    if torch.distributed.get_backend() == "nccl":
        rt.comm_device = str(device)
    if rt.world_size % sp:
        rt.close()
        raise ConfigError(f"distributed.sequence_parallel={sp} must divide the number of processes "
                          f"({rt.world_size})")
    return rt, device


def maybe_inject_fault(rt: Runtime, step: int) -> None:
    """The failure tests' hook (see ``FAULT_ENV``); nothing unless the variable names this rank."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rank, _, at = spec.partition("@")
    if int(rank) == rt.rank and int(at or 0) == step:
        print(f"rank {rt.rank}: {FAULT_ENV}={spec}: exiting abruptly at step {step}", file=sys.stderr, flush=True)
        os._exit(17)


def describe_failure(rt: Runtime, exc: BaseException) -> DistributedError:
    """One line for a collective that failed under us: which rank saw it, and why it happens."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return DistributedError(f"rank {rt.rank}/{rt.world_size}: a collective failed ({type(exc).__name__}: {first}); "
                            f"another process died or did not answer within distributed.timeout_s={rt.timeout_s:g} s "
                            "- see the first failing rank's error")


def is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or one raised from inside torch.distributed (gloo reports a
    closed peer connection as a plain RuntimeError)."""
    dist = torch.distributed
    if dist.is_available() and isinstance(exc, dist.DistError):
        return True
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and f"torch{os.sep}distributed{os.sep}" in last.tb_frame.f_code.co_filename
