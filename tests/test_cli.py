"""The command line: train (by shipped name or path), eval (one JSON object on stdout), sample
with best-of-K, `dancegrpo configs`; every user mistake is one line and exit 2, Ctrl-C is 130."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dancegrpo.cli import main
from dancegrpo.trainer.checkpoint import CheckpointManager, verify_checkpoint

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


def one_line_error(capsys, argv, *needles, command=None):
    """``main(argv)`` exits 2 and its last stderr line is ``dancegrpo CMD: error: ...`` with the needles."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"dancegrpo {command or argv[0]}: error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_sample_needs_reward_for_best_of(tmp_path, capsys):
    one_line_error(capsys, ["sample", "--config", CONFIG, "--best-of", "2", "--out", str(tmp_path)], "needs --reward")


def test_bad_override_is_a_clear_error(tmp_path, capsys):
    one_line_error(capsys, ["train", CONFIG, f"output_dir={tmp_path}", "optim.lrr=1"], "unknown config key 'optim.lrr'")
    one_line_error(capsys, ["train", CONFIG, f"output_dir={tmp_path}", "max_steps", "3"], "key=value", "'max_steps'")
    one_line_error(capsys, ["train", "max_steps=3"], "the first argument is the CONFIG")


def test_module_entry_point_eval_stdout_is_json():
    proc = subprocess.run([sys.executable, "-m", "dancegrpo.cli", "eval", CONFIG, "eval.num_prompts=4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["num_prompts"] == 4


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path)], "no complete checkpoint")
    one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path / "nope")], "'" + str(tmp_path / "nope") + "'",
                   "does not exist")


@pytest.mark.parametrize(("argv", "needles"), [
    (["train", CONFIG, "rewards.0.name=toyy"], ("rewards.0.name", "unknown reward 'toyy'", "did you mean toy")),
    (["eval", CONFIG, "model.name=toi"], ("model.name", "unknown model 'toi'", "did you mean toy")),
    (["eval", CONFIG, "data.name=shapez"], ("data.name", "unknown prompt dataset 'shapez'", "shapes")),
    (["eval", CONFIG, "model.kwargs.hiden=8"], ("model.name=toy", "hiden")),
    (["eval", "shapes_t2i", "model.kwargs.task=t2x"], ("model.name=shapes", "shapes_t2x")),
    (["sample", "--config", CONFIG, "--reward", "toyy", "--prompt", "red"], ("--reward", "unknown reward 'toyy'")),
])
def test_unknown_registry_names_and_arguments_are_one_line(tmp_path, capsys, argv, needles):
    one_line_error(capsys, [*argv, f"output_dir={tmp_path}"], *needles)


def test_invalid_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nmax_steps: 10\n  output_dir: x\n")  # an indented key under a scalar
    one_line_error(capsys, ["train", str(bad)], f"{bad}:3:", "invalid YAML", "mapping values are not allowed")


def test_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error(capsys, ["train", CONFIG, f"output_dir={tmp_path}", "device=cuda"], "device=cuda",
                   "CUDA is not available")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_lora_without_peft_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if not installed
    one_line_error(capsys, ["train", CONFIG, f"output_dir={tmp_path}", "lora.enabled=true", *QUIET],
                   "lora.enabled=true needs", "pip install peft")


def test_ema_on_a_run_without_ema_is_one_line(trained_run, capsys):
    one_line_error(capsys, ["eval", "--checkpoint", str(trained_run), "--ema"], "--ema", "no EMA weights")
    one_line_error(capsys, ["eval", CONFIG, "--ema"], "--ema needs --checkpoint")
    one_line_error(capsys, ["eval", CONFIG, "--checkpoint", str(trained_run)], "not both")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dancegrpo train: error:") and "config" in err[0]


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from dancegrpo.trainer import loop

    def broken(self):
        raise ZeroDivisionError("a bug, not a user mistake")

    monkeypatch.setattr(loop.Trainer, "train", broken)
    with pytest.raises(ZeroDivisionError):
        main(["train", CONFIG, f"output_dir={tmp_path}"])


# --------------------------------------------------------------------------- configs by name


def _shipped():
    root = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"
    return {p.stem: p.read_text().splitlines()[0].lstrip("#").strip() for p in sorted(root.glob("*.yaml"))}


def test_configs_lists_the_shipped_configs(capsys):
    assert main(["configs"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert {"toy", "shapes_t2i", "shapes_t2v", "shapes_i2v"} <= set(rows)
    assert rows == _shipped()
    assert "toy world" in rows["toy"]


def test_train_a_shipped_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no file called "toy" here: the name picks the shipped config
    assert main(["train", "toy", "output_dir=run", "max_steps=2", *QUIET]) == 0
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    one_line_error(capsys, ["train", "shapes_t2ii", "output_dir=run2"], "'shapes_t2ii'", "did you mean shapes_t2i",
                   "shipped configs:")
    one_line_error(capsys, ["train", "configs/toy.yaml", "output_dir=run2"], "does not exist", "pass toy")


# --------------------------------------------------------------------------- Ctrl-C


def test_interrupt_mid_save_leaves_no_partial_checkpoint(tmp_path, capsys, monkeypatch):
    from dancegrpo.trainer import checkpoint as ck

    real = ck._write_torch

    def interrupted(path, obj):
        if "step_00000004" in path.parents[1].name and path.parent.name == "rng":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(ck, "_write_torch", interrupted)
    out = tmp_path / "run"
    argv = ["train", CONFIG, f"output_dir={out}", "max_steps=6", "checkpoint_every=2", "log.progress=false",
            "log.num_sample_prompts=0"]
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line as a KeyboardInterrupt")
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    step2 = out / "checkpoints" / "step_00000002"
    assert err.startswith("dancegrpo train: interrupted; resume from") and str(step2) in err, err
    assert "resume=true" in err and "max_steps=6" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]  # no temp directory left


_SIGINT_ARGS = ["max_steps=100000", "checkpoint_every=1", "keep_checkpoints=2", "log.progress=false",
                "log.num_sample_prompts=0", "log.tensorboard=false"]


def test_ctrl_c_stops_cleanly_and_names_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "dancegrpo", "train", "toy", f"output_dir={out}", *_SIGINT_ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step_00000003" / "COMPLETE").is_file():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the training subprocess wrote no checkpoint in 120 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    latest = CheckpointManager(out / "checkpoints").latest()
    assert last.startswith("dancegrpo train: interrupted; resume from ") and str(latest) in last, last
    assert "dancegrpo train toy" in last and last.endswith("resume=true")
    names = [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".trash-")]
    assert all(n.startswith("step_") for n in names), names  # no half-written save (.tmp-*) left
    for n in names:
        verify_checkpoint(out / "checkpoints" / n)
