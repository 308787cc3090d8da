"""bench/algorithms/compare.py end to end on a tiny budget: a run, a skipped name, its outputs."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "bench" / "algorithms" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_writes_table_plot_and_points(tmp_path, capsys):
    compare = load()
    rc = compare.main(["--configs", "shapes_t2i_mixgrpo_flash", "shapes_t2i_no_such_algorithm", "--seeds", "0",
                       "--budget", "1", "--eval-prompts", "2", "--threads", "1", "--out", str(tmp_path),
                       "--override", "rollout.prompts_per_step=1", "rollout.group_size=2", "optim.train_batch_size=2",
                       "optim.gradient_accumulation_steps=1"])
    assert rc == 0
    assert "skipping shapes_t2i_no_such_algorithm" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    (run,) = data["runs"]
    assert run["steps"] == 1 and [p["step"] for p in run["points"]] == [0, 1]
    first, last = run["points"]
    assert first["nfe"] == 0 and last["nfe"] == (4 + 4) * 2 + 4 * 2  # flash rollout + window updates, 2 samples
    for key in ("heldout_reward", "heldout_correct", "heldout_position_size"):
        assert 0 <= last[key] <= 1
    table = (tmp_path / "results.md").read_text()
    assert "| mixgrpo_flash | shapes_t2i_mixgrpo_flash | 1.0 +- 0.0 | 24 +- 0 |" in table
    assert (tmp_path / "results.png").stat().st_size > 0
