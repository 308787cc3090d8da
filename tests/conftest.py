"""Test configuration.

* Triton kernels run under the interpreter on machines without a GPU: TRITON_INTERPRET must be
  set before any @triton.jit function is defined, so it is set here, before tests import
  dancegrpo.kernels. Detection uses nvidia-smi's presence, not a CUDA call (no device query
  at import time). Set DANCEGRPO_TEST_GPU=1 to force GPU mode.
* The ``seed`` fixture: a random seed per test, printed when the test fails.
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
def seed(request):
    """A fresh seed per test, seeding torch's global RNG, so inputs are random but reproducible:
    a failing test's report shows it, and DANCEGRPO_TEST_SEED=<seed> replays it."""
    fixed = os.environ.get("DANCEGRPO_TEST_SEED")
    s = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    return s


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if report.failed and seeds:
        line = f"seed {seeds[0]}: rerun with DANCEGRPO_TEST_SEED={seeds[0]} pytest '{item.nodeid}'"
        if hasattr(report.longrepr, "addsection"):
            report.longrepr.addsection("random seed", line)
        else:
            report.sections.append(("random seed", line))
    return report
