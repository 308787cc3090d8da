"""`make demo-video`'s entry point, shortened: both video tasks, two seeds in parallel processes,
base and trained models scored with the video diagnostics, tables and side-by-side GIFs written."""

import json

import pytest
from PIL import Image

from dancegrpo import demo_video
from dancegrpo.worlds.shapes.policy import build_policy


def test_demo_video_short_run(tmp_path, capsys):
    out = tmp_path / "demo_video"
    rc = demo_video.main(["--steps", "1", "--eval-prompts", "4", "--seeds", "0,1", "--out", str(out),
                          "rollout.prompts_per_step=1", "rollout.group_size=4", "sampler.num_steps=4"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for task in ("t2v", "i2v"):
        s = summary[task]
        assert set(s["after"]) == {"0", "1"} and s["steps"] == 1
        for stats in (s["before"], *s["after"].values()):
            assert stats["num_prompts"] == 4
            assert 0.0 <= stats["correct_rate_motion"] <= 1.0 and 0.0 <= stats["reward_motion_mean"] <= 1.0
        assert ("frame_trust_rate" in s["before"]) == (task == "i2v")
        # Each seed trained its own run (its own metrics) from the same base.
        for seed in (0, 1):
            metrics = (out / task / f"seed_{seed}" / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(m)["step"] for m in metrics] == [1]
        gif = Image.open(out / f"{task}_before_after.gif")
        assert gif.n_frames == build_policy(task).frames
        # 16 prompts x (base + 2 seeds) tiles, 6 to a row: 8 rows of 64-px tiles with 2-px gaps.
        assert gif.size == (6 * 66 + 2, 8 * 66 + 2)
    table = (out / "summary.md").read_text()
    assert "| t2v held-out | base | GRPO seed 0 | GRPO seed 1 |" in table
    assert "% keep a contradicted frame" in table
    assert "% asked motion" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "t2i"], "--tasks must list t2v and/or i2v"),
    (["--seeds", "0,0"], "--seeds must name distinct seeds"),
    (["--seeds", "a"], "--seeds must be comma-separated ints"),
])
def test_demo_video_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        demo_video.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
