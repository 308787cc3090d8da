"""Run a function on N CPU processes joined by a gloo process group, from inside a test.

``run_ranks(fn, world_size, *args)`` spawns the processes, calls ``fn(rank, world_size, *args)``
in each after ``init_process_group("gloo")`` on a free loopback port, and returns the ranks'
return values in rank order. A rank that raises fails the test with that rank's traceback;
a rank that hangs is killed after ``timeout`` seconds. ``fn`` must be importable (a module-level
function of a test module), as the processes start with the ``spawn`` method.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N processes share the machine's cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, out = results.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(got))} did not finish "
                                     f"within {timeout} s") from None
            if ok:
                got[rank] = out
            else:
                errors.append(f"rank {rank} failed:\n{out}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [got[r] for r in range(world_size)]
