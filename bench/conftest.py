"""Benchmarks: `pytest bench/ --benchmark-only` (CPU, or the GPU when one is present).

Shapes: an image latent 8x16x128x128 and a video latent 2x16x21x60x104
(DANCEGRPO_BENCH_VIDEO_BATCH=8 for the GPU target shape). model_output bf16, latents fp32.

A backend that ``auto`` would use on this device but that cannot run here (say, the compiled
extension is not importable) is named in a warning block at the start and at the end of the
run, never silently left out. At the end the run prints a summary table (median per op and
backend, speedup over eager PyTorch) and writes the run as JSON to
``bench/results/<device>-<name>.json`` (``-partial`` when only some benchmarks ran;
``--bench-json PATH`` to choose the file, ``--bench-json none`` for no file).
"""

import os

import pytest
import torch

from . import report

SHAPES = {
    "image": (8, 16, 128, 128),
    "video": (int(os.environ.get("DANCEGRPO_BENCH_VIDEO_BATCH", "2")), 16, 21, 60, 104),
}
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_rows: list[dict] = []
_deselected = [0]


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status() -> dict[str, list[str]]:
    """Backend -> reasons it cannot run the ops on the bench device (empty: it can)."""
    from dancegrpo.ops import dispatch

    probe = [torch.empty(1, device=bench_device())]
    return {name: dispatch.get_backend(name).not_supported_reasons("step_logprob", probe)
            for name in ("native", "triton")}


def missing_backends() -> dict[str, list[str]]:
    """Backends auto would use on this device (dispatch.PRIORITY) that cannot run here."""
    from dancegrpo.ops import dispatch

    expected = dispatch.PRIORITY.get(bench_device().type, ())
    return {name: reasons for name, reasons in _status().items() if reasons and name in expected}


def compiled_backends():
    """Backends that can run here, plus the reference and torch.compile of the reference."""
    return ["torch", "torch.compile"] + [name for name, reasons in _status().items() if not reasons]


@pytest.fixture(params=list(SHAPES))
def shape(request):
    return request.param


def pytest_addoption(parser):
    parser.addoption("--bench-json", default="auto",
                     help="where the run's JSON goes: auto (bench/results/<device>-<name>.json), a path, or none")


def pytest_deselected(items):
    _deselected[0] += len(items)


def _warn(terminal, lines):
    for line in lines:
        terminal.write_line(line, red=True, bold=True)


def pytest_collection_finish(session):
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        _warn(terminal, report.missing_block(missing_backends(), bench_device().type))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(bench, "stats", None)
    if stats:  # None when timing is disabled (--benchmark-disable) or the test failed first
        _rows.append({"group": stats.group, "backend": stats.extra_info.get("backend"),
                      "median_s": stats.stats.median, "rounds": stats.stats.rounds,
                      "extra_info": dict(stats.extra_info)})


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    config = terminalreporter.config
    device = bench_device().type
    missing = missing_backends()
    terminalreporter.section(f"dancegrpo benchmark summary ({device}: {report.device_name(device)}, "
                             f"{torch.get_num_threads()} threads, torch {torch.__version__})")
    for line in report.summary(_rows, missing):
        terminalreporter.write_line(line)
    _warn(terminalreporter, report.missing_block(missing, device))
    target = config.getoption("--bench-json")
    if target == "none":
        return
    failed = bool(terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"))
    args = list(config.invocation_params.args)
    partial = bool(_deselected[0] or failed or config.getoption("keyword") or config.getoption("markexpr")
                   or any("::" in a for a in args))
    path = target if target != "auto" else report.results_path(
        RESULTS_DIR, device, report.device_name(device), torch.get_num_threads(), partial)
    report.write_json(report.run_record(_rows, missing, device, SHAPES, "pytest " + " ".join(args)), path)
    terminalreporter.write_line(f"run written to {path}")
