"""Run logs: ``metrics.jsonl`` (one JSON object per step), TensorBoard when installed, a tqdm bar."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path

import torch

__all__ = ["MetricsLogger", "read_metrics", "peak_memory_mb"]

log = logging.getLogger("dancegrpo.trainer")


def _clean(value):
    """JSON-safe scalars: tensors -> float, NaN/inf -> None (JSON has no NaN)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch (CUDA), else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def read_metrics(path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
    return out


class MetricsLogger:
    """Appends one JSON line per step (flushed, so a crash loses at most the current step)."""

    def __init__(self, output_dir, *, tensorboard: bool, progress: bool, total: int, initial: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="grpo", dynamic_ncols=True)

    def rewind_to(self, step: int) -> None:
        """On resume from checkpoint ``step``: the lines of later steps (they are run again) move
        to ``metrics.discarded.jsonl``; the log is rewritten atomically, so a crash here loses nothing."""
        rows = read_metrics(self.path)
        later = [m for m in rows if m.get("step", 0) > step]
        if not later:
            return
        discarded = self.path.with_name("metrics.discarded.jsonl")
        with open(discarded, "a") as f:
            f.write("".join(json.dumps(m) + "\n" for m in later))
            f.flush()
            os.fsync(f.fileno())
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(m) + "\n" for m in rows if m.get("step", 0) <= step))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        log.info("resumed at step %d: moved %d later logged steps to %s", step, len(later), discarded.name)

    def log(self, metrics: dict) -> None:
        clean = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        step = metrics["step"]
        if self.writer is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(k, v, step)
        if self.bar is not None:
            post = {"reward": clean.get("reward_mean"), "ratio": clean.get("ratio_first_update")}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in post.items() if v is not None}, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
