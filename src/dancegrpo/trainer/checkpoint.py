"""Atomic checkpoints: a checkpoint either loads exactly as saved or is never picked.

Layout: ``output_dir/checkpoints/step_00000010/`` holding ``model.safetensors`` (the full
state dict, or only the LoRA adapters), ``ema.safetensors`` (when EMA is on),
``old_policy.safetensors`` (DiffusionNFT's old policy, algorithm=nft),
``optimizer.pt``, ``rng.pt`` (torch CPU/CUDA, Python, NumPy and the trainer's generators),
``state.json`` (step and run state), ``config.yaml`` and, written last, ``COMPLETE`` with
the size and SHA-256 of every other file.

Writing: everything goes to a hidden temp directory, each file is fsynced, then ``COMPLETE``,
then the directory is fsynced and renamed into place (atomic on POSIX) and the parent is
fsynced. A crash at any point leaves either the old state or a temp directory that is never
read (and is cleaned up by the next save); an interrupted save (Ctrl-C) removes its temp
directory itself. Reading verifies ``COMPLETE``'s sizes and hashes, so
even a checkpoint damaged after the fact is skipped (with a warning) in favour of an older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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


def verify_checkpoint(path) -> dict:
    """The parsed ``COMPLETE`` marker of a checkpoint directory; raises CheckpointError when any
    file is missing or differs from what was written."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {MARKER} marker (the save did not finish)")
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MARKER} marker ({exc})") from exc
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: file {name} differs from what was saved (size or SHA-256)")
    return info


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` (``output_dir/checkpoints``)."""

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

    def save(self, step: int, *, model_state: dict, optimizer_state: dict, rng_state: dict, run_state: dict,
             config_yaml: str, ema_state: dict | None = None, export=None,
             old_policy_state: dict | None = None) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones. Returns its directory.

        export: optional ``f(directory)`` writing more files (e.g. a model's weights in its
        library's format) into the checkpoint before it is sealed; they are hashed like the rest.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            tmp.mkdir()
            self._write(tmp, step, model_state, optimizer_state, rng_state, run_state, config_yaml, ema_state, export,
                        old_policy_state)
        except BaseException:  # an error or Ctrl-C mid-save: leave no half-written directory behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it
            self._discard(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    @staticmethod
    def _write(tmp: Path, step, model_state, optimizer_state, rng_state, run_state, config_yaml, ema_state,
               export, old_policy_state=None) -> None:
        files = {
            "model.safetensors": lambda p: _write_safetensors(p, model_state),
            "optimizer.pt": lambda p: _write_torch(p, optimizer_state),
            "rng.pt": lambda p: _write_torch(p, rng_state),
            "state.json": lambda p: _write_bytes(p, json.dumps({"step": step, **run_state}, indent=1).encode()),
            "config.yaml": lambda p: _write_bytes(p, config_yaml.encode()),
        }
        if ema_state is not None:
            files["ema.safetensors"] = lambda p: _write_safetensors(p, ema_state)
        if old_policy_state is not None:
            files["old_policy.safetensors"] = lambda p: _write_safetensors(p, old_policy_state)
        meta = {}
        for name, write in files.items():
            write(tmp / name)
            meta[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        if export is not None:
            export(tmp)
            for f in sorted(q for q in tmp.rglob("*") if q.is_file()):
                name = f.relative_to(tmp).as_posix()
                if name not in meta:
                    _fsync_file(f)
                    meta[name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
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
    def load(path) -> dict:
        """Verify and read a checkpoint directory: model/ema state dicts, optimizer, rng, state, config."""
        path = Path(path)
        verify_checkpoint(path)
        out = {
            "path": path,
            "model": load_file(str(path / "model.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
            "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
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
