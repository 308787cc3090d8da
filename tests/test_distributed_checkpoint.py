"""Sharded checkpoints: saved on 2 processes (FSDP2 or DDP) they load on 1, and the reverse, with
identical model, AdamW and EMA tensors, and the run continues as it would have; only the trainable
parameters under trainable_only; a rank that fails mid-save never replaces the previous one; the
optimizer comes back exactly as it was (even without state); a misfit is one clear error."""

import io
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks
from safetensors.torch import load_file
from torch import nn

from dancegrpo.trainer import checkpoint as ck
from dancegrpo.trainer.checkpoint import CheckpointError, CheckpointManager, capture_rng

LR = 0.01


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 8 output rows shard 4/4 over 2 ranks, 5 rows unevenly 3/2
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    m.register_buffer("scale", torch.linspace(0.5, 1.5, 5))
    return m


def _wrap(m: nn.Module, strategy: str) -> nn.Module:
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(m, mesh=mesh)
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(m)
    return m


def _named(m: nn.Module):
    return (m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m).named_parameters()


def _setup(strategy: str, lr: float = LR, frozen: bool = False):
    m = _model()
    if frozen:  # like a LoRA base: the first layer never trains
        m[0].requires_grad_(False)
    m = _wrap(m, strategy)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    ema = {n: p.detach().clone() for n, p in _named(m) if p.requires_grad}
    return m, opt, ema


def _train(m, opt, ema, steps: int, rank: int) -> None:
    for s in range(steps):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * s + rank))
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for n, p in _named(m):
                if n in ema:
                    ema[n].lerp_(p.detach(), 0.1)


def _snapshot(m, opt, ema) -> dict:
    """The whole model / optimizer / EMA state on rank 0 (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from dancegrpo.distributed.checkpoint import full_tensors, rank_and_world

    model, optim = get_state_dict(m, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema = full_tensors(ema)
    if rank_and_world()[0] != 0:
        return {}
    return {"model": {k: v.clone() for k, v in model.items()},
            "optim": {k: {s: t.clone() for s, t in v.items()} for k, v in optim["state"].items()},
            "lr": [g["lr"] for g in optim["param_groups"]], "ema": ema}


def _pack(obj) -> bytes:
    """Tensors leave a rank as bytes: shared-memory tensors die with the process that made them."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys() and a["optim"].keys() == b["optim"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["optim"]:
        assert a["optim"][k].keys() == b["optim"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}, k
        for s in a["optim"][k]:
            assert torch.equal(a["optim"][k][s], b["optim"][k][s]), (k, s)
    assert a["lr"] == b["lr"] == [LR]
    assert a["ema"].keys() == b["ema"].keys() and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def _save(root, step, m, opt, ema, tag, trainable_only=False):
    return CheckpointManager(root, keep=0).save(step, model=m, optimizer=opt, ema=ema, trainable_only=trainable_only,
                                                rng_state={"tag": tag, **capture_rng({})}, run_state={},
                                                config_yaml="seed: 1\n")


def _restore(root, m, opt, ema, trainable_only=False):
    manager = CheckpointManager(root)
    return manager.restore(manager.latest(), model=m, optimizer=opt, ema=ema, trainable_only=trainable_only)


def _save_on_ranks(rank, world, strategy, root):
    m, opt, ema = _setup(strategy)
    _train(m, opt, ema, 2, rank)
    _save(root, 2, m, opt, ema, f"rank {rank}")
    return _pack(_snapshot(m, opt, ema))


def _load_on_ranks(rank, world, strategy, root):
    m, opt, ema = _setup(strategy, lr=0.5)  # lr comes back from the checkpoint
    ckpt = _restore(root, m, opt, ema)
    return _pack((_snapshot(m, opt, ema), ckpt["rng"]["tag"], ckpt["state"]["world_size"]))


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_saved_on_two_processes_loads_on_one(tmp_path, strategy):
    saved = _unpack(run_ranks(_save_on_ranks, 2, strategy, tmp_path)[0])
    step = tmp_path / "step_00000002"
    # each rank wrote its own file (FSDP: its shards; DDP: its share of the replicated tensors)
    assert sorted(p.name for p in (step / "training").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in (step / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    m, opt, ema = _setup("plain", lr=0.5)
    ckpt = _restore(tmp_path, m, opt, ema)
    _assert_same(saved, _snapshot(m, opt, ema))
    assert ckpt["state"] == {"step": 2, "world_size": 2} and ckpt["rng"]["tag"] == "rank 0"
    # the consolidated export holds the whole model and EMA
    exported = load_file(str(step / "model.safetensors"))
    assert exported.keys() == saved["model"].keys()
    assert all(torch.equal(exported[k], saved["model"][k]) for k in exported)
    assert all(torch.equal(load_file(str(step / "ema.safetensors"))[k], v) for k, v in saved["ema"].items())


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_saved_on_one_process_loads_on_two(tmp_path, strategy):
    m, opt, ema = _setup("plain")
    _train(m, opt, ema, 2, 0)
    _save(tmp_path, 2, m, opt, ema, "single")
    saved = _snapshot(m, opt, ema)
    (loaded, tag, world), (_, tag1, _) = map(_unpack, run_ranks(_load_on_ranks, 2, strategy, tmp_path))
    _assert_same(saved, loaded)
    assert world == 1 and tag == tag1 == "single"  # a different world size: every rank gets rank 0's RNG


def _save_trainable_on_ranks(rank, world, root):
    m, opt, ema = _setup("fsdp", frozen=True)
    _train(m, opt, ema, 2, rank)
    _save(root, 2, m, opt, ema, f"rank {rank}", trainable_only=True)
    return _pack(_snapshot(m, opt, ema))


def test_trainable_only_saves_and_exports_just_the_parameters_that_train(tmp_path):
    saved = _unpack(run_ranks(_save_trainable_on_ranks, 2, tmp_path)[0])
    trains = ["2.bias", "2.weight"]
    step = tmp_path / "step_00000002"
    assert sorted(load_file(str(step / "model.safetensors"))) == trains
    assert sorted(load_file(str(step / "ema.safetensors"))) == trains
    m, opt, ema = _setup("plain", lr=0.5, frozen=True)
    with torch.no_grad():
        m[0].weight.fill_(7.0)  # the frozen base comes from the model as built, not from the checkpoint
    _restore(tmp_path, m, opt, ema, trainable_only=True)
    assert bool((m[0].weight == 7.0).all())
    loaded = _snapshot(m, opt, ema)
    for snap in (saved, loaded):
        snap["model"] = {n: t for n, t in snap["model"].items() if not n.startswith("0.")}
    _assert_same(saved, loaded)


def _failing_second_save(rank, world, root):
    m, opt, ema = _setup("fsdp")
    _train(m, opt, ema, 1, rank)
    _save(root, 1, m, opt, ema, "first")
    first = _snapshot(m, opt, ema)
    _train(m, opt, ema, 1, rank)
    seen = {}
    if rank == 1:  # rank 1 dies after writing its shard, before the ranks agree that all is written
        real = ck._write_torch

        def crash(path, obj):
            seen["own shard written"] = (Path(path).parents[1] / "training" / "__1_0.distcp").is_file()
            raise OSError("rank 1 lost its disk (simulated)")

        ck._write_torch = crash
    try:
        _save(root, 2, m, opt, ema, "second")
        error = None
    except BaseException as exc:  # noqa: BLE001 - checked by the test
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if rank == 1:
            ck._write_torch = real
    return _pack((error, seen, first))


def test_a_rank_failing_mid_save_leaves_the_previous_checkpoint_newest(tmp_path, caplog):
    (err0, _, first), (err1, seen1, _) = map(_unpack, run_ranks(_failing_second_save, 2, tmp_path))
    assert seen1 == {"own shard written": True}
    assert err1 == "OSError: rank 1 lost its disk (simulated)"
    assert err0.startswith("CheckpointError: checkpoint step 2: writing the per-rank files: rank 1 failed "
                           "(OSError: rank 1 lost its disk (simulated))")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temp directory left
    m, opt, ema = _setup("plain", lr=0.5)
    assert _restore(tmp_path, m, opt, ema)["rng"]["tag"] == "first"
    _assert_same(first, _snapshot(m, opt, ema))
    # a rank's shard damaged afterwards: the checkpoint is never picked
    shard = tmp_path / "step_00000001" / "training" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    with caplog.at_level("WARNING", logger="dancegrpo.trainer"):
        assert CheckpointManager(tmp_path).latest() is None
    assert "file training/__1_0.distcp differs" in caplog.text
    with pytest.raises(CheckpointError, match="training/__1_0.distcp differs"):
        CheckpointManager.restore(tmp_path / "step_00000001", model=m, optimizer=opt, ema=ema)


def test_optimizer_state_is_restored_as_it_was_even_where_there_is_none(tmp_path):
    # saved before the first step, and after a step in which one layer had no gradient
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2), nn.Linear(3, 1))
    opt = torch.optim.AdamW(m.parameters(), lr=LR)
    manager = CheckpointManager(tmp_path, keep=0)
    before_step = manager.save(0, model=m, optimizer=opt, rng_state={}, run_state={}, config_yaml="")
    assert not opt.state  # saving did not give the optimizer state (it would change the next step)
    m[1](m[0](torch.randn(4, 3))).sum().backward()
    opt.step()
    after_step = manager.save(1, model=m, optimizer=opt, rng_state={}, run_state={}, config_yaml="")
    for path, with_state in ((before_step, []), (after_step, [0, 1, 2, 3])):
        m2 = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2), nn.Linear(3, 1))
        opt2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
        CheckpointManager.restore(path, model=m2, optimizer=opt2)
        loaded, saved = opt2.state_dict(), opt.state_dict()
        assert sorted(loaded["state"]) == with_state and loaded["param_groups"][0]["lr"] == LR
        for i in with_state:
            assert all(torch.equal(loaded["state"][i][k], saved["state"][i][k]) for k in saved["state"][i])


def test_a_checkpoint_that_does_not_fit_the_model_is_one_clear_error(tmp_path):
    m = nn.Sequential(nn.Linear(2, 1))
    path = CheckpointManager(tmp_path).save(1, model=m, optimizer=torch.optim.AdamW(m.parameters()), rng_state={},
                                            run_state={}, config_yaml="")
    for other, why in ((nn.Sequential(nn.Linear(3, 1)), r"Size mismatch .* for model.0.weight"),
                       (nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1)), "Missing key .*: model.1.weight")):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} does not fit the model, optimizer or EMA built "
                                                  rf"from the config \(was model.*\): rank 0: .*{why}"):
            CheckpointManager.restore(path, model=other, optimizer=torch.optim.AdamW(other.parameters()))


def _global_batch(s: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1000 + s))


def _steps(m, opt, first: int, last: int, rank: int, world: int) -> None:
    """Steps first..last on the global batch of 8, split evenly over the ranks; FSDP averages the
    ranks' gradients, so every world size takes the same steps up to reduction order."""
    for s in range(first, last + 1):
        rows = _global_batch(s).chunk(world)[rank]
        m(rows).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _run_fsdp(rank, world, root, resume: bool):
    m, opt, _ = _setup("fsdp")
    if resume:
        _restore(root, m, opt, None)
    else:
        _steps(m, opt, 1, 2, rank, world)
        _save(root, 2, m, opt, None, "fsdp")
    _steps(m, opt, 3, 4, rank, world)
    return _pack(_snapshot(m, opt, {}))


def test_a_run_continues_on_another_number_of_processes_as_it_would_have(tmp_path):
    # 2 processes -> 1
    two = _unpack(run_ranks(_run_fsdp, 2, tmp_path / "a", False)[0])
    m, opt, _ = _setup("plain")
    _restore(tmp_path / "a", m, opt, None)
    _steps(m, opt, 3, 4, 0, 1)
    one = _snapshot(m, opt, {})
    # 1 process -> 2
    m, opt, _ = _setup("plain")
    _steps(m, opt, 1, 2, 0, 1)
    _save(tmp_path / "b", 2, m, opt, None, "plain")
    _steps(m, opt, 3, 4, 0, 1)
    uninterrupted_one = _snapshot(m, opt, {})
    resumed_two = _unpack(run_ranks(_run_fsdp, 2, tmp_path / "b", True)[0])
    for a, b in ((two, one), (uninterrupted_one, resumed_two)):
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6, msg=k)
        assert [int(v["step"]) for v in a["optim"].values()] == [int(v["step"]) for v in b["optim"].values()]
        assert all(int(v["step"]) == 4 for v in a["optim"].values())
