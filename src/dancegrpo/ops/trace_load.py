"""Loading the backends from inside a ``torch.compile`` trace.

Dynamo can trace neither ``importlib`` nor a backend's one-time loading (the C++ extension's
import, ``torch.library`` registrations, Triton's kernel definitions). A function marked
``assume_constant_result`` is instead run for real at trace time, outside the traced region,
and only its (constant) result enters the graph. It loads every backend at once: dynamo reads
the registry dict once per trace, so a backend loaded after that read would be invisible to the
rest of the trace. Dispatch imports this module only while tracing (an import statement runs for
real under dynamo), so ``import dancegrpo`` never imports ``torch._dynamo``.
"""

from __future__ import annotations

import torch

from .dispatch import _BACKEND_PATHS, get_backend


@torch.compiler.assume_constant_result
def load_backends() -> bool:
    for name in _BACKEND_PATHS:
        try:
            get_backend(name).unavailable_reasons()  # imports the backend and loads its kernels
        except ImportError:
            pass  # a module that cannot import: selecting it later says why (dispatch.availability)
    return True
