"""Test configuration.

* Triton kernels run under the interpreter on machines without a GPU: TRITON_INTERPRET must be
  set before any @triton.jit function is defined, so it is set here, before tests import
  dancegrpo.kernels. Detection uses nvidia-smi's presence, not a CUDA call (no device query
  at import time). Set DANCEGRPO_TEST_GPU=1 to force GPU mode.
* ``@pytest.mark.gpu`` tests are skipped without CUDA; ``@pytest.mark.bigmem`` tests only run
  with DANCEGRPO_BIGMEM=1.
"""

import os
import shutil

# OpenMP threads that spin at barriers while another process holds the CPU multiply the suite's
# time on a busy 2-core machine; sleeping waiters cost nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if os.environ.get("DANCEGRPO_TEST_GPU") != "1" and shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    bigmem = os.environ.get("DANCEGRPO_BIGMEM") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "bigmem" in item.keywords and not bigmem:
            item.add_marker(pytest.mark.skip(reason="needs DANCEGRPO_BIGMEM=1 (>16 GiB host memory)"))


@pytest.fixture
def seed():
    """A fresh seed per test (logged on failure) so inputs are random but reproducible."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s
