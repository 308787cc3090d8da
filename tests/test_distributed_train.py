"""Training over several processes (gloo on the CPU): the 2-process run makes the 1-process run's
samples, rewards and advantages exactly, and its losses and weights up to reduction order, with
replicated (ddp) and sharded (fsdp) weights; the torchrun command line; a rank that dies."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_utils import free_port, run_ranks

from dancegrpo.trainer import Trainer, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"

# P * G = 16 samples; rollout forwards of 8 on any number of processes (same shapes, same bits)
BASE = ["log.progress=false", "log.num_sample_prompts=0", "log.sample_every=0", "log.tensorboard=false",
        "checkpoint_every=0", "rollout.prompts_per_step=2", "rollout.group_size=8", "rollout.batch_size=8",
        "optim.train_batch_size=2", "optim.gradient_accumulation_steps=2", "sampler.num_steps=6"]


def _train(rank, world, out, overrides, config="toy", base=BASE):
    """A rank's run: its metrics, the global rewards and advantages of each step, the final weights."""
    from torch.distributed.tensor import DTensor

    from dancegrpo.trainer import loop

    seen = []
    original = loop.group_advantages

    def recording(rewards, *args, **kwargs):
        adv = original(rewards, *args, **kwargs)
        seen.append((rewards.clone(), adv.clone()))
        return adv

    loop.group_advantages = recording
    try:
        trainer = Trainer(load_config(CONFIGS / f"{config}.yaml", [f"output_dir={out}", *base, *overrides]))
        sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
        units = sum(type(m).__name__.startswith("FSDP") for m in trainer.model.modules())
        split = sum(getattr(m, "sequence_parallel", None) is not None for m in trainer.model.modules())
        history = trainer.train()
        weights = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()  # every rank: whole
                   for k, v in trainer.model.state_dict().items()}
    finally:
        loop.group_advantages = original
    return _bytes({"history": history, "seen": seen, "weights": weights, "sharded": sharded,
                   "units": units, "split": split})


def _bytes(obj) -> bytes:
    """Tensors leave a spawned process as bytes (shared-memory handles die with it)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _ranks(world, *args):
    return [torch.load(io.BytesIO(b), weights_only=False) for b in run_ranks(_train, world, *args, timeout=300)]


def _compare(one, two, batch=16):
    for (r1, _), (r2, _) in zip(one["seen"], two["seen"], strict=True):
        assert r1.shape == r2.shape and r1.shape[0] == batch
    (r1, a1), (r2, a2) = one["seen"][0], two["seen"][0]
    assert torch.equal(r1, r2) and torch.equal(a1, a2)  # first rollout: same weights, so the same bits
    for (r1, a1), (r2, a2) in zip(one["seen"][1:], two["seen"][1:], strict=True):
        torch.testing.assert_close(r2, r1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a2, a1, rtol=1e-3, atol=1e-3)
    for m1, m2 in zip(one["history"], two["history"], strict=True):
        for key in ("loss", "grad_norm", "reward_mean", "ratio_first_update", "clip_fraction"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-6), key
        assert m2["optimizer_steps"] == m1["optimizer_steps"] and m2["trained_samples"] == m1["trained_samples"]
    for k, w in one["weights"].items():
        torch.testing.assert_close(two["weights"][k], w, rtol=1e-4, atol=1e-5)


def _initial_weights():
    from dancegrpo.worlds.toy import build_toy_model

    return build_toy_model(task="t2i").state_dict()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    (res,) = _ranks(1, str(out), ["max_steps=3"])
    return res


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_reproduce_the_one_process_run(strategy, one_process, tmp_path):
    res = _ranks(2, str(tmp_path), ["max_steps=3", f"distributed.strategy={strategy}"])
    assert [r["sharded"] for r in res] == [strategy == "fsdp"] * 2
    _compare(one_process, res[0])
    _compare(one_process, res[1])  # every rank sees the global metrics
    init = _initial_weights()
    assert any(not torch.equal(w, init[k]) for k, w in one_process["weights"].items())  # it trained
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # rank 0 alone logs


@pytest.mark.parametrize("extra", [
    ["advantage.best_of_k=2", "loss.kl_beta=0.05", "optim.ema_decay=0.9"],
    ["lora.enabled=true", "lora.rank=4", "loss.kl_beta=0.05", "distributed.reference=cpu"],
], ids=["best_of_k-kl-ema", "lora-kl"])
def test_two_sharded_processes_with_uneven_shares_kl_ema_and_lora(extra, tmp_path_factory):
    # best-of-k leaves the ranks uneven shares of each optimizer step (zero-weight padding)
    one = _ranks(1, str(tmp_path_factory.mktemp("a")), ["max_steps=2", *extra])[0]
    two = _ranks(2, str(tmp_path_factory.mktemp("b")), ["max_steps=2", *extra, "distributed.strategy=fsdp"])[0]
    assert two["sharded"]
    _compare(one, two)
    assert all(m["kl"] == pytest.approx(n["kl"], rel=1e-3, abs=1e-7) for m, n in zip(one["history"], two["history"], strict=True))


SHAPES = ["max_steps=2", "device=cpu", "log.progress=false", "log.tensorboard=false", "log.sample_every=0",
          "log.num_sample_prompts=1", "checkpoint_every=0", "model.kwargs.pretrained=false", "model.kwargs.size=16",
          "data.kwargs.size=16", "model.kwargs.frames=2", "data.kwargs.frames=2", "rollout.prompts_per_step=1",
          "rollout.group_size=4", "rollout.batch_size=2", "sampler.num_steps=3", "optim.train_batch_size=1",
          "optim.gradient_accumulation_steps=2", "eval.batch_size=1", "model.kwargs.dit.checkpointing=full"]


def test_sharded_video_dit_blocks_with_activation_checkpointing(tmp_path_factory):
    one = _ranks(1, str(tmp_path_factory.mktemp("a")), [], "shapes_t2v", SHAPES)[0]
    out = tmp_path_factory.mktemp("b")
    two = _ranks(2, str(out), ["distributed.strategy=fsdp"], "shapes_t2v", SHAPES)
    assert two[0]["sharded"] and two[0]["units"] == 1 + 4  # the DiT and each of its 4 blocks
    _compare(one, two[0], batch=4)
    assert (out / "samples" / "step_000002.gif").is_file()  # every rank generated, rank 0 wrote


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)], ids=["save-on-2-resume-on-1", "save-on-1-resume-on-2"])
def test_a_sharded_run_resumes_on_another_number_of_processes(first, then, one_process, tmp_path):
    fsdp = ["distributed.strategy=fsdp"]
    _ranks(first, str(tmp_path), ["max_steps=2", *fsdp])
    res = _ranks(then, str(tmp_path), ["max_steps=3", "resume=true", *fsdp])[0]
    assert [m["step"] for m in res["history"]] == [3]
    (r1, _), (r2, _) = one_process["seen"][2], res["seen"][0]
    torch.testing.assert_close(r2, r1, rtol=1e-4, atol=1e-5)
    assert res["history"][0]["loss"] == pytest.approx(one_process["history"][2]["loss"], rel=1e-3, abs=1e-6)
    for k, w in one_process["weights"].items():
        torch.testing.assert_close(res["weights"][k], w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override,message", [
    ("distributed.strategy=zero3", "distributed.strategy must be one of ('ddp', 'fsdp'), got 'zero3'"),
    ("distributed.timeout_s=0", "distributed.timeout_s must be finite > 0, got 0.0"),
    ("distributed.backend=mpi", "distributed.backend must be one of ('auto', 'nccl', 'gloo'), got 'mpi'"),
    ("distributed.sequence_parallel=0", "distributed.sequence_parallel must be >= 1, got 0"),
])
def test_distributed_section_is_validated(override, message):
    from dancegrpo.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "toy.yaml", [override])
    assert str(err.value) == message


def test_one_process_without_torchrun(tmp_path, monkeypatch):
    from dancegrpo.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(CONFIGS / "toy.yaml", [f"output_dir={tmp_path}", *BASE, "distributed.sequence_parallel=2"])
    with pytest.raises(ConfigError, match="^distributed.sequence_parallel=2 needs that many processes: launch with "
                                          "torchrun$"):
        Trainer(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's other variables are missing
    with pytest.raises(ConfigError, match="^WORLD_SIZE > 1 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        Trainer(load_config(CONFIGS / "toy.yaml", [f"output_dir={tmp_path}", *BASE]))
    assert not torch.distributed.is_initialized()


def _refuse(rank, world, out):
    try:
        Trainer(load_config(CONFIGS / "toy.yaml", [f"output_dir={out}", *BASE, "rollout.prompts_per_step=1",
                                                   "rollout.group_size=3"]))
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path):
    msgs = run_ranks(_refuse, 2, str(tmp_path))
    assert msgs[0] == msgs[1] == ("ConfigError: rollout.prompts_per_step * rollout.group_size = 3 samples per step "
                                  "must be divisible by the 2 data-parallel processes")


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def test_torchrun_command_line(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dancegrpo", "train", "toy", f"output_dir={tmp_path}", *BASE,
           "max_steps=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_torchrun_ends_the_job_when_a_rank_dies(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dancegrpo", "train", "toy", f"output_dir={tmp_path}", *BASE,
           "max_steps=4", "distributed.timeout_s=20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=_env(DANCEGRPO_FAULT_KILL="1@1"))
    assert done.returncode != 0
    assert "rank 1: DANCEGRPO_FAULT_KILL=1@1: exiting abruptly at step 1" in done.stderr
    root = done.stderr[done.stderr.index("Root Cause"):]
    assert "rank      : 1" in root and "exitcode  : 17" in root


def test_a_dead_rank_ends_the_others_with_one_clear_line(tmp_path):
    # the ranks started as torchrun starts them (its environment), without the agent that would
    # kill the survivors itself: a rank must notice on its own
    port = free_port()
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DANCEGRPO_FAULT_KILL="1@1")
        procs.append(subprocess.Popen([sys.executable, "-m", "dancegrpo", "train", "toy", f"output_dir={tmp_path}",
                                       *BASE, "max_steps=4", "distributed.timeout_s=20"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.monotonic() - start < 90
    assert procs[1].returncode == 17 and "exiting abruptly at step 1" in outs[1][1]
    assert procs[0].returncode == 2, outs[0][1][-3000:]
    last = outs[0][1].strip().splitlines()[-1]
    assert last.startswith("dancegrpo train: error: rank 0/2: a collective failed"), last
    assert "distributed.timeout_s=20" in last
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def _flux_fsdp(rank, world, out, folder, prompts):
    cfg = load_config(CONFIGS / "flux_lora_fsdp.yaml", [
        f"model.kwargs.path={folder}", "model.kwargs.height=16", "model.kwargs.width=16",
        "model.kwargs.max_sequence_length=16", f"data.kwargs.path={prompts}", "rewards=[{name: jpeg_compressibility}]",
        "sampler.num_steps=3", "max_steps=1", "rollout.prompts_per_step=1", "rollout.group_size=4",
        "rollout.batch_size=0", "optim.gradient_accumulation_steps=2", "device=cpu", f"output_dir={out}",
        "log.sample_every=0", "log.num_sample_prompts=0", "log.tensorboard=false", "log.progress=false"])
    trainer = Trainer(cfg)
    units = sum(type(m).__name__.startswith("FSDP") for m in trainer.model.modules())
    blocks = len(trainer.model._checkpoint_units())
    (metrics,) = trainer.train()
    return units, blocks, metrics["optimizer_steps"], metrics["skipped"], metrics["loss"]


def test_shipped_sharded_flux_config_runs_on_two_processes(tmp_path, tmp_path_factory):
    from diffusers_fixtures import prompt_file, tiny_pipeline

    folder = tiny_pipeline("flux", tmp_path_factory)
    res = run_ranks(_flux_fsdp, 2, str(tmp_path / "run"), str(folder), str(prompt_file(tmp_path)), timeout=300)
    units, blocks, steps, skipped, loss = res[0]
    assert res[0] == res[1]
    assert blocks >= 2 and units == blocks + 1  # each FLUX block, then the transformer
    assert steps == 2 and skipped == 0 and loss == loss
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sequence_parallel_run_reproduces_the_one_process_run(strategy, tmp_path_factory):
    # both ranks are one data-parallel slot: each video's tokens are split over them
    one = _ranks(1, str(tmp_path_factory.mktemp("a")), ["distributed.sequence_parallel=1"], "shapes_t2v_sp", SHAPES)[0]
    out = tmp_path_factory.mktemp("b")
    two = _ranks(2, str(out), [f"distributed.strategy={strategy}"], "shapes_t2v_sp", SHAPES)
    assert one["split"] == 0 and two[0]["split"] == two[1]["split"] == 1  # the DiT runs sequence-parallel
    _compare(one, two[0], batch=4)
    _compare(one, two[1], batch=4)
    assert (out / "samples" / "step_000002.gif").is_file()
