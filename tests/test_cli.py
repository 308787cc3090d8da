"""CLI smoke tests: train, eval (one JSON object on stdout), sample with best-of-K, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dancegrpo.cli import main

CONFIG = str(Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs" / "toy.yaml")
QUIET = ["log.progress=false", "log.num_sample_prompts=2", "checkpoint_every=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    assert main(["train", CONFIG, f"output_dir={out}", "max_steps=40", *QUIET]) == 0
    return out


def test_train_writes_the_run(trained_run):
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and json.loads(lines[-1])["step"] == 40
    assert (trained_run / "checkpoints" / "step_00000040" / "COMPLETE").is_file()
    assert (trained_run / "reward_curve.png").is_file() and (trained_run / "config.yaml").is_file()


def test_eval_prints_one_json_object_and_training_helped(trained_run, capsys):
    assert main(["eval", CONFIG, "eval.num_prompts=8", "eval.samples_per_prompt=4"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(trained_run), "eval.num_prompts=8", "eval.samples_per_prompt=4"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    trained = json.loads(out)
    for key in ("reward_mean", "reward_toy_mean", "reward_toy_std", "correct_rate", "num_samples"):
        assert key in trained and key in base
    assert trained["num_samples"] == 32
    # held-out (deterministic ODE) reward: 40 toy GRPO steps raise it clearly
    assert trained["reward_mean"] > base["reward_mean"] + 0.1, (base, trained)


def test_sample_best_of(trained_run, tmp_path):
    out = tmp_path / "samples"
    argv = ["sample", "--checkpoint", str(trained_run), "--prompt", "red", "--prompt", "cyan", "--num", "3",
            "--best-of", "4", "--reward", "toy", "--out", str(out), "--seed", "7"]
    assert main(argv) == 0
    records = json.loads((out / "samples.json").read_text())
    assert [r["prompt"] for r in records] == ["red"] * 3 + ["cyan"] * 3
    assert all((out / r["file"]).is_file() for r in records) and (out / "grid.png").is_file()
    # the same 12 candidates per prompt without selection: best-of-4 kept the max of each run of 4
    plain_argv = ["sample", "--checkpoint", str(trained_run), "--prompt", "red", "--prompt", "cyan", "--num", "12",
                  "--reward", "toy", "--out", str(tmp_path / "plain"), "--seed", "7"]
    assert main(plain_argv) == 0
    plain = [r["score"] for r in json.loads((tmp_path / "plain" / "samples.json").read_text())]
    best = [max(plain[4 * g: 4 * g + 4]) for g in range(6)]
    assert [r["score"] for r in records] == pytest.approx(best, abs=1e-6)
    assert len(set(plain)) > 6  # the candidates differ, so the selection mattered


def test_sample_needs_reward_for_best_of(tmp_path):
    with pytest.raises(SystemExit, match="needs --reward"):
        main(["sample", "--config", CONFIG, "--best-of", "2", "--out", str(tmp_path)])


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    assert main(["train", CONFIG, f"output_dir={tmp_path}", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_module_entry_point_eval_stdout_is_json():
    proc = subprocess.run([sys.executable, "-m", "dancegrpo.cli", "eval", CONFIG, "eval.num_prompts=4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_prompts"] == 4


def test_unavailable_model_and_missing_checkpoint_are_clear_errors(tmp_path, capsys):
    assert main(["eval", CONFIG, "model.name=hunyuanvideo"]) == 2
    assert "diffusers adapter" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
