"""``python -m dancegrpo.env``: versions, the device, and every backend's availability with reasons.

Paste its output into bug reports. It is the only place that loads every backend on purpose.
"""

from __future__ import annotations

import importlib.util
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

    from dancegrpo import __version__
    from dancegrpo.ops import dispatch

    lines = [f"dancegrpo {__version__}", f"python {sys.version.split()[0]} ({platform.platform()})",
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
    for name, reasons in dispatch.availability(device).items():
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
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
