"""Atomic checkpoints: a checkpoint either loads exactly as saved or is never picked.

One format for any number of processes. Layout: ``output_dir/checkpoints/step_00000010/`` holding
``training/`` (model and optimizer state, and the EMA shadow, in torch.distributed.checkpoint's
format: one ``__<rank>_0.distcp`` shard file per rank plus ``.metadata``; only the LoRA
adapters under LoRA), ``rng/rank_<rank>.pt`` (each rank's torch CPU/CUDA, Python, NumPy and
trainer-generator states), ``model.safetensors`` and ``ema.safetensors`` (the whole trainable
state gathered on rank 0, for inference and exports), ``old_policy.safetensors``
(DiffusionNFT's old policy, algorithm=nft, one process), ``state.json`` (step, world size, run
state), ``config.yaml``, the model's own-format export if any and, written last, ``COMPLETE``
with the size and SHA-256 of every other file.

Writing: everything goes to a hidden temp directory (its name chosen by rank 0), each file is
fsynced; the ranks then wait for each other and learn whether every rank wrote its files; only
then rank 0 writes ``COMPLETE``, fsyncs the directory, renames it into place (atomic on POSIX)
and fsyncs the parent. A crash or a failed rank at any point leaves either the old state or a
temp directory that is never read (and is cleaned up by the next save); a save that fails or
is interrupted (Ctrl-C) removes its temp directory itself. Reading verifies ``COMPLETE``'s sizes
and hashes, so even a checkpoint damaged after the fact is skipped (with a warning) in favour
of an older one. Every rank must see the same directory (a shared file system across nodes).

Ctrl-C (SIGINT) during a save is held until the save is sealed, then raised: a save takes
seconds, and torch.distributed.checkpoint turns a KeyboardInterrupt raised inside its writers
into a CheckpointException, which would end the run with a traceback instead of the usual
"interrupted; resume from ..." line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..distributed.checkpoint import (
    all_gather_objects,
    full_model_state,
    full_tensors,
    load_training_state,
    rank_and_world,
    save_training_state,
    shard_files,
)
from ..errors import CheckpointError

__all__ = ["CheckpointManager", "capture_rng", "restore_rng", "verify_checkpoint", "CheckpointError"]

log = logging.getLogger("dancegrpo.trainer")

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _sigint_held():
    """Hold SIGINT for the block (main thread only: elsewhere signals are not ours to handle) and
    raise KeyboardInterrupt after it if one arrived; an error in the block wins over it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if arrived:
        raise KeyboardInterrupt


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # some platforms cannot open a directory; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights) or are non-contiguous.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


# --------------------------------------------------------------------------- RNG state


def capture_rng(generators: dict[str, torch.Generator]) -> dict:
    """Every random state a run consumes, as tensors and plain values (loadable weights_only)."""
    mt = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np.asarray(mt[1], dtype=np.int64)), "pos": int(mt[2]),
                  "has_gauss": int(mt[3]), "cached": float(mt[4])},
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    missing = set(generators) - set(state["generators"])
    if missing:
        raise CheckpointError(f"checkpoint has no state for generators {sorted(missing)}")
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- verify / find


def verify_checkpoint(path, part: tuple[int, int] = (0, 1)) -> dict:
    """The parsed ``COMPLETE`` marker of a checkpoint directory; raises CheckpointError when any
    file is missing or differs from what was written.

    part: ``(i, n)`` hashes only every n-th file from the i-th on (the ranks of a distributed run
    share the work; together they check every file)."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (the save did not finish)")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MARKER} marker ({exc})") from exc
    i, n = part
    for name, meta in sorted(files.items())[i::n]:
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {name} differs from what was saved (size or SHA-256)")
    return info


def _file_meta(root: Path, files) -> dict:
    return {f.relative_to(root).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def _agree(fn, what: str):
    """Run ``fn`` on every rank, then all ranks learn whether every rank succeeded (a barrier):
    the rank that failed raises its own error, the others a CheckpointError naming it.
    Returns the ranks' results in rank order."""
    err, out = None, None
    try:
        out = fn()
    except BaseException as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
        err = exc
    results = all_gather_objects((None, out) if err is None else (f"{type(err).__name__}: {err}", None))
    if err is not None:
        raise err
    for rank, (why, _) in enumerate(results):
        if why is not None:
            raise CheckpointError(f"{what}: rank {rank} failed ({why})")
    return [r for _, r in results]


def _dcp_error(exc: BaseException) -> str:
    """The first line of each rank's failure in a DCP CheckpointException."""
    failures = getattr(exc, "_failures", None) or {}
    parts = [f"rank {r}: {type(e).__name__}: {e}" for r, (e, _) in sorted(failures.items())]
    return "; ".join(parts) or str(exc)


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` (``output_dir/checkpoints``).

    ``save`` and ``restore`` are collective when a process group is initialised: every rank
    calls them with its (DDP- or FSDP2-wrapped) model and optimizer; in one process they need none.
    """

    def __init__(self, root, keep: int = 2):
        self.root = Path(root)
        self.keep = int(keep)

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))]
        return sorted(out, reverse=True)

    def scan(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """``(newest checkpoint that verifies or None, [(newer damaged checkpoint, why)]``)."""
        damaged = []
        for _, path in self.step_dirs():
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping checkpoint %s: %s", path.name, exc)
                damaged.append((path, str(exc).removeprefix(f"{path}: ")))
                continue
            return path, damaged
        return None, damaged

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies (older ones are tried when a newer one is damaged)."""
        return self.scan()[0]

    def save(self, step: int, *, model, optimizer, rng_state: dict, run_state: dict, config_yaml: str,
             ema: dict | None = None, trainable_only: bool = False, export=None,
             old_policy_state: dict | None = None) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones (collective). Returns its directory.

        model, optimizer: the module as trained (plain, DDP or FSDP2) and its optimizer.
        trainable_only: save only the parameters that train (LoRA adapters), not the frozen base.
        ema: the EMA shadow tensors by parameter name (sharded like the parameters under FSDP2).
        rng_state: this rank's :func:`capture_rng`. export: optional ``f(directory)`` run on rank 0
        writing more files (e.g. a model's weights in its library's format) into the checkpoint
        before it is sealed; they are hashed like the rest.
        """
        with _sigint_held():
            return self._save(step, model=model, optimizer=optimizer, rng_state=rng_state, run_state=run_state,
                              config_yaml=config_yaml, ema=ema, trainable_only=trainable_only, export=export,
                              old_policy_state=old_policy_state)

    def _save(self, step, *, model, optimizer, rng_state, run_state, config_yaml, ema, trainable_only, export,
              old_policy_state) -> Path:
        rank, world = rank_and_world()
        final = self.root / f"step_{step:08d}"
        tmp = _agree(lambda: self._new_temp(step) if rank == 0 else None, f"checkpoint step {step}")[0]
        try:
            # every rank: its DCP shard, then the whole state gathered to rank 0 for the export
            _agree(lambda: save_training_state(tmp / "training", model, optimizer, trainable_only=trainable_only,
                                               ema=ema), f"checkpoint step {step}: writing the sharded state")
            full = full_model_state(model, trainable_only=trainable_only)
            full_ema = full_tensors(ema) if ema is not None else None

            def own_files():
                rng_file = tmp / "rng" / f"rank_{rank:05d}.pt"
                rng_file.parent.mkdir(exist_ok=True)
                _write_torch(rng_file, rng_state)
                return _file_meta(tmp, [*shard_files(tmp / "training", rank), rng_file])

            # the barrier: nothing is sealed before every rank has written (and hashed) its files
            metas = _agree(own_files, f"checkpoint step {step}: writing the per-rank files")

            def seal():
                self._write(tmp, step, world, full, full_ema, run_state, config_yaml, export, old_policy_state,
                            {k: v for m in metas for k, v in m.items()})
                if final.exists():  # the same step saved again (e.g. a resumed run): replace it
                    self._discard(final)
                os.rename(tmp, final)
                _fsync_dir(self.root)
                self._prune()

            _agree(seal if rank == 0 else (lambda: None), f"checkpoint step {step}: sealing")
        except BaseException:  # an error or Ctrl-C mid-save: leave no half-written directory behind
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _new_temp(self, step: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        tmp = self.root / f".tmp-step_{step:08d}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        return tmp

    @staticmethod
    def _write(tmp: Path, step, world, model_state, ema_state, run_state, config_yaml, export, old_policy_state,
               meta) -> None:
        """Rank 0's files, the hashes of everything not hashed yet, then ``COMPLETE``."""
        files = {
            "model.safetensors": lambda p: _write_safetensors(p, model_state),
            "state.json": lambda p: _write_bytes(p, json.dumps({"step": step, "world_size": world, **run_state},
                                                               indent=1).encode()),
            "config.yaml": lambda p: _write_bytes(p, config_yaml.encode()),
        }
        if ema_state is not None:
            files["ema.safetensors"] = lambda p: _write_safetensors(p, ema_state)
        if old_policy_state is not None:
            files["old_policy.safetensors"] = lambda p: _write_safetensors(p, old_policy_state)
        for name, write in files.items():
            write(tmp / name)
        if export is not None:
            export(tmp)
        for f in sorted(q for q in tmp.rglob("*") if q.is_file()):
            name = f.relative_to(tmp).as_posix()
            if name not in meta:  # DCP's .metadata, rank 0's files and the export
                _fsync_file(f)
                meta[name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        _fsync_dir(tmp / "training")
        _write_bytes(tmp / MARKER, json.dumps({"step": step, "files": meta}, indent=1).encode())
        _fsync_dir(tmp)

    def _remove_stale_temps(self) -> None:
        for p in self.root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        complete = [p for _, p in self.step_dirs() if (p / MARKER).is_file()]
        for p in complete[self.keep:]:
            self._discard(p)

    def _discard(self, path: Path) -> None:
        """Delete a checkpoint directory: renamed away first, so an interrupted delete never
        leaves a half-deleted ``step_*`` behind (the next save removes the trash)."""
        trash = self.root / f".trash-{path.name}-{time.monotonic_ns()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def restore(path, *, model, optimizer, ema: dict | None = None, trainable_only: bool = False) -> dict:
        """Verify checkpoint ``path`` and load it into ``model``, ``optimizer`` and ``ema`` in place
        (collective; any number of processes, whatever the number that saved it).

        Returns ``{"path", "rng", "state", "config_yaml"}``: ``rng`` is this rank's saved RNG state
        when the world size is unchanged, else rank 0's (per-rank streams cannot be split or merged).
        """
        path = Path(path)
        rank, world = rank_and_world()
        _agree(lambda: verify_checkpoint(path, part=(rank, world)), f"checkpoint {path}")
        state = json.loads((path / "state.json").read_text())
        if not (path / "training").is_dir():
            raise CheckpointError(f"checkpoint {path} has no training/ state (written by an older dancegrpo): its "
                                  "weights load for eval and export, but it cannot resume a run")
        try:
            load_training_state(path / "training", model, optimizer, trainable_only=trainable_only, ema=ema)
        except BaseException as exc:
            if type(exc).__name__ != "CheckpointException":
                raise
            raise CheckpointError(f"checkpoint {path} does not fit the {'LoRA adapters of the ' if trainable_only else ''}"
                                  f"model, optimizer or EMA built from the config (was model.*, lora.* or "
                                  f"optim.ema_decay changed?): {_dcp_error(exc)}") from None
        saved_world = int(state.get("world_size", 1))
        rng_rank = rank if saved_world == world else 0
        out = {
            "path": path,
            "rng": torch.load(path / "rng" / f"rank_{rng_rank:05d}.pt", map_location="cpu", weights_only=True),
            "state": state,
            "config_yaml": (path / "config.yaml").read_text(),
        }
        if (path / "old_policy.safetensors").is_file():
            out["old_policy"] = load_file(str(path / "old_policy.safetensors"))
        return out

    @staticmethod
    def load(path) -> dict:
        """Verify and read a checkpoint's consolidated weights for inference (one process, no
        optimizer): ``{"path", "model", "ema" (when EMA was on), "state", "config_yaml"}``."""
        path = Path(path)
        verify_checkpoint(path)
        out = {
            "path": path,
            "model": load_file(str(path / "model.safetensors")),
            "state": json.loads((path / "state.json").read_text()),
            "config_yaml": (path / "config.yaml").read_text(),
        }
        if (path / "ema.safetensors").is_file():
            out["ema"] = load_file(str(path / "ema.safetensors"))
        if (path / "old_policy.safetensors").is_file():
            out["old_policy"] = load_file(str(path / "old_policy.safetensors"))
        return out


def describe_damaged(damaged: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{p.name}: {why}" for p, why in damaged)


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from a path that is one, or a run's output_dir / checkpoints dir
    (then its newest complete checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (give a checkpoint directory or a run's output_dir)")
    if (p / MARKER).is_file() or _STEP_DIR.match(p.name):
        verify_checkpoint(p)
        return p
    damaged = []
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found, bad = CheckpointManager(root).scan()
            if found is not None:
                return found
            damaged += bad
    if damaged:
        raise CheckpointError(f"no usable checkpoint at {str(p)!r}, every one is damaged: {describe_damaged(damaged)}")
    raise CheckpointError(f"no complete checkpoint found at {str(p)!r}")
