"""`make demo`'s entry point, shortened: base eval, a few GRPO steps, eval after, outputs written."""

import json

from dancegrpo import demo


def test_demo_short_run(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = demo.main(["--steps", "2", "--eval-prompts", "8", "--skip-ops", "--out", str(out),
                    "rollout.prompts_per_step=2", "rollout.group_size=4", "log.progress=false",
                    "sampler.num_steps=6"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for phase in ("before", "after"):
        assert 0.0 <= summary[phase]["reward_mean"] <= 1.0
        assert summary[phase]["num_prompts"] == 8
    assert (out / "before.png").is_file() and (out / "after.png").is_file()
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert abs(metrics[0]["ratio_first_update"] - 1) < 1e-3
    assert "% correct" in capsys.readouterr().out
