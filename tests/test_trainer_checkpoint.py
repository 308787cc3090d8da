"""Checkpoints users can trust: exact resume, crash and SIGKILL during save, damaged files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dancegrpo.trainer import Trainer, load_config
from dancegrpo.trainer import checkpoint as ck
from dancegrpo.trainer.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


def toy_cfg(out, *overrides):
    return load_config(CONFIGS / "toy.yaml", [f"output_dir={out}", "log.progress=false", "log.num_sample_prompts=0",
                                              "log.sample_every=0", "checkpoint_every=2", "keep_checkpoints=0",
                                              *overrides])


def _metrics_file(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _metrics(out):
    return _metrics_file(Path(out) / "metrics.jsonl")


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    # dance timesteps, dropout-free model, EMA on: every random stream must be restored
    extra = ["optim.ema_decay=0.9", "max_steps=6"]
    full = Trainer(toy_cfg(tmp_path / "full", *extra))
    full.train()
    Trainer(toy_cfg(tmp_path / "part", "optim.ema_decay=0.9", "max_steps=3")).train()  # checkpoints at 2 and 3
    # pretend the process died after step 3's checkpoint was written but a step-4 line was logged
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "reward_mean": 0.0, "loss": 123.0}) + "\n")
    resumed = Trainer(toy_cfg(tmp_path / "part", *extra, "resume=true"))
    assert resumed.step == 3
    resumed.train()
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    # the step-4 line logged before the "crash" is kept aside, not deleted
    assert [m["loss"] for m in _metrics_file(tmp_path / "part" / "metrics.discarded.jsonl")] == [123.0]
    for key in ("loss", "reward_mean", "grad_norm", "clip_fraction", "ratio_first_update"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert all(torch.equal(full.ema.shadow[n], resumed.ema.shadow[n]) for n in full.ema.shadow)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    t = Trainer(toy_cfg(tmp_path, "max_steps=1", "resume=true"))
    assert t.step == 0 and t.resumed_from is None


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    real = ck._write_torch

    def crashing(path, obj):
        if "step_00000004" in path.parents[1].name and path.parent.name == "rng":
            raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(ck, "_write_torch", crashing)
    with pytest.raises(OSError, match="simulated"):
        Trainer(toy_cfg(tmp_path, "max_steps=6")).train()
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_00000002"]  # the failed save removed its temp directory
    assert CheckpointManager(root).latest().name == "step_00000002"
    monkeypatch.setattr(ck, "_write_torch", real)
    resumed = Trainer(toy_cfg(tmp_path, "max_steps=6", "resume=true"))
    assert resumed.step == 2
    resumed.train()
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_ctrl_c_during_a_save_lands_after_it(tmp_path, monkeypatch):
    """SIGINT arriving mid-save is held until the checkpoint is sealed, then stops the run as a
    KeyboardInterrupt (torch.distributed.checkpoint would otherwise turn it, raised inside its
    writers, into a CheckpointException and a traceback)."""
    real = ck._write_torch

    def interrupted(path, obj):
        if "step_00000004" in path.parents[1].name and path.parent.name == "rng":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a signal handler runs between bytecodes: give it the chance
        real(path, obj)

    monkeypatch.setattr(ck, "_write_torch", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        Trainer(toy_cfg(tmp_path, "max_steps=6")).train()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    root = tmp_path / "checkpoints"
    assert CheckpointManager(root).latest().name == "step_00000004"  # the save finished first
    verify_checkpoint(root / "step_00000004")
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_resume_when_every_checkpoint_is_damaged_is_an_error_and_keeps_the_logs(tmp_path):
    Trainer(toy_cfg(tmp_path, "max_steps=4")).train()
    root, log = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    for step in (2, 4):
        f = root / f"step_{step:08d}" / "training" / "__0_0.distcp"
        f.write_bytes(f.read_bytes()[:-10])
    before = log.read_bytes()
    with pytest.raises(CheckpointError, match=r"resume=true but every checkpoint in .* is damaged \(step_00000004: "
                                              r"file training/__0_0.distcp differs.*; step_00000002: file training/__0_0.distcp differs"):
        Trainer(toy_cfg(tmp_path, "max_steps=6", "resume=true"))
    assert log.read_bytes() == before
    from dancegrpo.cli import main

    assert main(["train", str(CONFIGS / "toy.yaml"), f"output_dir={tmp_path}", "resume=true"]) == 2
    assert log.read_bytes() == before


def test_a_fresh_run_never_wipes_an_existing_one(tmp_path):
    # a run that died before its first checkpoint: only its logs
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    before = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run \(3 logged steps in metrics.jsonl\): pass resume=true.*"
                                         r"overwrite=true"):
        Trainer(toy_cfg(tmp_path, "max_steps=2"))
    with pytest.raises(ValueError, match="resume=true but output_dir .* has no checkpoint, only 3 logged steps"):
        Trainer(toy_cfg(tmp_path, "max_steps=2", "resume=true"))
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    # overwrite=true deletes the old run and starts again
    Trainer(toy_cfg(tmp_path, "max_steps=2", "overwrite=true")).train()
    assert [m["step"] for m in _metrics(tmp_path)] == [1, 2] and all(m["loss"] != 1.0 for m in _metrics(tmp_path))
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoints up to step 2, 2 logged steps"):
        Trainer(toy_cfg(tmp_path, "max_steps=4"))
    Trainer(toy_cfg(tmp_path, "max_steps=1", "overwrite=true")).train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # step 2 went with the old run
    assert [m["step"] for m in _metrics(tmp_path)] == [1]
    # the saved config continues the run (overwrite was this command's, not the run's)
    assert Trainer(load_config(tmp_path / "config.yaml", ["resume=true", "max_steps=2"])).step == 1


_KILL_SCRIPT = r"""
import sys, time
from pathlib import Path
from dancegrpo.trainer import checkpoint as ck, load_config, train

real = ck._write_safetensors
def slow(path, tensors):
    real(path, tensors)
    if "step_00000004" in path.parent.name:
        Path(sys.argv[2]).write_text("saving")  # tell the parent we are mid-save
        time.sleep(120)
ck._write_safetensors = slow
train(load_config(sys.argv[3], [f"output_dir={sys.argv[1]}", "max_steps=6", "checkpoint_every=2",
                                "keep_checkpoints=0", "log.progress=false", "log.num_sample_prompts=0"]))
"""


def test_sigkill_during_save_never_leaves_a_bad_checkpoint(tmp_path):
    out, flag = tmp_path / "run", tmp_path / "flag"
    script = tmp_path / "run_and_hang.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(flag), str(CONFIGS / "toy.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the training subprocess never reached the step-4 save"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert CheckpointManager(root).latest().name == "step_00000002"
    assert not (root / "step_00000004").exists()
    resumed = Trainer(toy_cfg(out, "max_steps=6", "resume=true"))
    assert resumed.step == 2
    resumed.train()
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5, 6]
    verify_checkpoint(root / "step_00000006")


def test_damaged_checkpoint_is_skipped_for_an_older_one(tmp_path, caplog):
    Trainer(toy_cfg(tmp_path, "max_steps=4")).train()
    root = tmp_path / "checkpoints"
    model_file = root / "step_00000004" / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])  # e.g. a disk error after the save
    with pytest.raises(CheckpointError, match="differs from what was saved"):
        verify_checkpoint(root / "step_00000004")
    with caplog.at_level("WARNING", logger="dancegrpo.trainer"):
        assert CheckpointManager(root).latest().name == "step_00000002"
    assert any("skipping checkpoint step_00000004" in r.message for r in caplog.records)
    (root / "step_00000002" / "COMPLETE").unlink()
    assert CheckpointManager(root).latest() is None


def test_keep_prunes_old_checkpoints(tmp_path):
    Trainer(toy_cfg(tmp_path, "max_steps=6", "keep_checkpoints=2")).train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000004", "step_00000006"]
