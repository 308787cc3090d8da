"""What a benchmark run leaves behind: a table a person can read, and a JSON of the run.

Rows are ``(group, backend, median seconds)`` as pytest-benchmark measured them; the group
names one op, mode and shape (``step_logprob-forward-image``). The table has one line per
group and one column per backend, each with its speedup over the eager PyTorch backend.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys

# Columns, in order: the eager PyTorch ops (the baseline), torch.compile of them, ours.
COLUMNS = ("torch", "torch.compile", "native", "triton")
HEADINGS = {"torch": "eager", "torch.compile": "compile", "native": "native", "triton": "triton"}


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def results_path(results_dir: str, device: str, name: str, threads: int, partial: bool) -> str:
    """``<device>-<name>-<threads>t.json``; ``-partial`` when only some benchmarks ran."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")[:60]
    tail = f"-{threads}t" if device == "cpu" else ""
    return os.path.join(results_dir, f"{device}-{slug}{tail}{'-partial' if partial else ''}.json")


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def summary(rows: list[dict], missing: dict[str, list[str]]) -> list[str]:
    """The table: median ms per backend and its speedup over eager (``x``), fastest marked ``*``."""
    groups: dict[str, dict[str, float]] = {}
    others: dict[str, dict[str, float]] = {}  # comparisons that are not backends of one op
    for r in rows:
        into = groups if r["backend"] in COLUMNS else others
        into.setdefault(r["group"], {})[r["backend"]] = r["median_s"]
    width = max([len(g) for g in groups] + [len("op-mode-shape")])
    head = f"{'op-mode-shape':<{width}}" + "".join(f"  {HEADINGS[c]:>16}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for group in sorted(groups):
        times = groups[group]
        eager = times.get("torch")
        best = min(times, key=times.get)
        cells = []
        for c in COLUMNS:
            if c not in times:
                cell = "missing" if c in missing else "-"
            else:
                speed = f" ({eager / times[c]:.1f}x)" if eager and c != "torch" else ""
                cell = f"{'*' if c == best and len(times) > 1 else ''}{_ms(times[c])}{speed}"
            cells.append(f"  {cell:>16}")
        lines.append(f"{group:<{width}}" + "".join(cells))
    lines.append("median ms per call; (Nx) = speedup over eager PyTorch; * = fastest; "
                 "- = not measured for this op")
    for group in sorted(others):  # e.g. a diffusers pipeline's own loop against our adapter
        times = others[group]
        first = next(iter(times.values()))
        cells = [f"{name} {_ms(t)}" + ("" if t is first else f" ({t / first:.2f}x)") for name, t in times.items()]
        lines.append(f"{group}: " + ", ".join(cells) + " (median ms; (Nx) = time relative to the first)")
    return lines


def missing_block(missing: dict[str, list[str]], device: str) -> list[str]:
    """A warning that cannot be missed: backends auto would use here but that could not run."""
    if not missing:
        return []
    lines = ["!" * 72, f"WARNING: backends missing from this benchmark on {device} (no rows for them):"]
    for name, reasons in missing.items():
        lines.append(f"  {name}: " + "; ".join(reasons))
    lines += ["  `python -m dancegrpo.env` shows where dancegrpo and its extension were imported from.",
              "!" * 72]
    return lines


def run_record(rows: list[dict], missing: dict[str, list[str]], device: str, shapes: dict,
               command: str) -> dict:
    import torch

    import dancegrpo

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dancegrpo": dancegrpo.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "shapes": {k: list(v) for k, v in shapes.items()},
        "command": command,
        "missing_backends": missing,
        "results": rows,
    }


def write_json(record: dict, path: str) -> None:
    """Written whole or not at all: a temporary file renamed over the target."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
