"""``python -m dancegrpo.env``: versions, the device, and every backend's availability with reasons.

Paste its output into bug reports. It is the only place that loads every backend on purpose.
It names the folder dancegrpo was imported from (a checkout or a stray copy on ``sys.path``
can hide the installed package and its compiled extension) and ends with a warning block
when the native backend cannot run here.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "installed (version unknown)"


def report() -> str:
    import torch

    import dancegrpo
    from dancegrpo.ops import dispatch

    where = os.path.dirname(os.path.abspath(dancegrpo.__file__))
    lines = [f"dancegrpo {dancegrpo.__version__} from {where}",
             f"python {sys.version.split()[0]} ({platform.platform()})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    for pkg in ("triton", "numpy", "safetensors", "diffusers", "transformers", "peft", "flash_attn", "xformers"):
        lines.append(f"{pkg:<12} {_version(pkg)}")
    device = "cpu"
    if torch.cuda.is_available():
        device = "cuda"
        lines.append(f"device: {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)})")
    else:
        lines.append(f"device: cpu ({torch.get_num_threads()} threads); no CUDA device")
    lines.append(f"\nop backends on {device} (auto tries {', '.join(dispatch.PRIORITY.get(device, ('torch',)))}):")
    availability = dispatch.availability(device)
    for name, reasons in availability.items():
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        extra = ""
        if name == "native" and not reasons:
            extra = f" [{dispatch.get_backend('native').build_info()}]"
        lines.append(f"  {name:<8} {status}{extra}")
    attention = importlib.util.find_spec("dancegrpo.models.attention")
    if attention is not None:
        from dancegrpo.models import attention as attn

        if hasattr(attn, "availability"):
            lines.append(f"\nattention backends on {device}:")
            for name, reasons in attn.availability(device).items():
                lines.append(f"  {name:<8} {'available' if not reasons else 'unavailable: ' + '; '.join(reasons)}")
    lines += _native_warnings(availability["native"], where, device)
    return "\n".join(lines)


def _native_warnings(reasons: list[str], where: str, device: str) -> list[str]:
    """Blocks that make a missing or mismatched native backend impossible to overlook."""
    if reasons:
        built = sorted(f for f in os.listdir(where) if f.startswith("_C.") and f.endswith((".so", ".pyd")))
        return _block(f"the native backend cannot run on {device}; `auto` takes the next backend above.",
                      *(f"why: {r}" for r in reasons), f"dancegrpo imported from {where}",
                      f"compiled extension there: {', '.join(built) or 'none'}",
                      "to build it: install torch, then `pip install --no-build-isolation .` (`-e .` in a "
                      "clone; CUDA kernels also need nvcc, i.e. CUDA_HOME)")
    loaded = os.path.dirname(os.path.abspath(sys.modules["dancegrpo._C"].__file__))
    if loaded != where:  # e.g. an editable install of another checkout supplies what this copy lacks
        return _block(f"dancegrpo._C was loaded from {loaded},", f"not from the imported package {where}:",
                      "the two may be different versions; remove the stray copy from sys.path")
    return []


def _block(first: str, *more: str) -> list[str]:
    return ["", "!" * 72, f"WARNING: {first}", *(f"  {m}" for m in more), "!" * 72]


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
