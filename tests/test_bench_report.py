"""bench/report.py: the summary table a person reads and the JSON a README table cites."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_report", BENCH / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

ROWS = [
    {"group": "step_logprob-forward-image", "backend": "torch", "median_s": 0.040},
    {"group": "step_logprob-forward-image", "backend": "torch.compile", "median_s": 0.020},
    {"group": "step_logprob-forward-image", "backend": "native", "median_s": 0.005},
    {"group": "advantages+loss", "backend": "torch", "median_s": 3e-4},
]


def _cells(lines, group):
    (line,) = [ln for ln in lines if ln.startswith(group + " ")]
    return line[len(group):].split("  ")


def test_summary_gives_each_backend_its_speedup_over_eager():
    lines = report.summary(ROWS, missing={})
    cells = [c.strip() for c in _cells(lines, "step_logprob-forward-image") if c.strip()]
    assert cells == ["40", "20 (2.0x)", "*5 (8.0x)", "-"]
    cells = [c.strip() for c in _cells(lines, "advantages+loss") if c.strip()]
    assert cells == ["0.3", "-", "-", "-"]


def test_missing_backend_is_marked_in_the_table_and_warned_about():
    missing = {"native": ["dancegrpo._C is not importable"]}
    lines = report.summary(ROWS[:2], missing)
    cells = [c.strip() for c in _cells(lines, "step_logprob-forward-image") if c.strip()]
    assert cells == ["40", "*20 (2.0x)", "missing", "-"]
    block = report.missing_block(missing, "cpu")
    assert block[1].startswith("WARNING") and "  native: dancegrpo._C is not importable" in block
    assert report.missing_block({}, "cpu") == []


def test_results_path_and_json(tmp_path):
    full = report.results_path(str(tmp_path), "cpu", "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", 2, False)
    assert Path(full).name == "cpu-intel-xeon-gold-6338-cpu-2-00ghz-2t.json"
    part = report.results_path(str(tmp_path), "cpu", "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", 2, True)
    assert Path(part).name.endswith("-2t-partial.json")
    record = report.run_record(ROWS, {}, "cpu", {"image": (8, 16, 128, 128)}, "pytest bench")
    report.write_json(record, full)
    back = json.loads(Path(full).read_text())
    assert back["results"] == ROWS and back["shapes"] == {"image": [8, 16, 128, 128]}
    assert back["torch"] and back["threads"] >= 1 and back["date"] and back["device_name"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(full).name]  # no temporary left


def test_comparisons_that_are_not_backends_get_their_own_line():
    rows = ROWS + [{"group": "rollout-flux", "backend": "pipeline", "median_s": 0.040},
                   {"group": "rollout-flux", "backend": "adapter_ode", "median_s": 0.038}]
    lines = report.summary(rows, missing={})
    assert not [ln for ln in lines if ln.startswith("rollout-flux ")]  # not squeezed into the backend columns
    (line,) = [ln for ln in lines if ln.startswith("rollout-flux:")]
    assert "pipeline 40, adapter_ode 38 (0.95x)" in line
