"""The DiffusionNFT trainer (``algorithm: nft``): its pieces against readable formulas, one update
on a fixed batch, the old policy, exact resume, and the shipped shapes config through the CLI."""

import json
from pathlib import Path

import pytest
import torch

from dancegrpo.errors import ConfigError
from dancegrpo.trainer import Trainer, load_config
from dancegrpo.trainer.nft import old_policy_decay, optimality

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


def nft_cfg(out, *overrides):
    return load_config(CONFIGS / "toy.yaml", [
        f"output_dir={out}", "algorithm=nft", "rollout.share_noise=false", "log.progress=false", "log.num_sample_prompts=0", "log.sample_every=0",
        "checkpoint_every=2", "keep_checkpoints=0", "nft.timestep_fraction=0.25", "nft.decay_rate=0.1",
        *overrides])


def _metrics(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_optimality_maps_clipped_advantages_to_probabilities():
    adv = torch.tensor([-9.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    expected = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0])
    torch.testing.assert_close(optimality(adv, 5.0), expected)


def test_old_policy_decay_schedule():
    # the paper's schedules: flat, then a linear rise capped at the maximum
    assert [old_policy_decay(u, start=0, rate=0.001, maximum=0.5) for u in (0, 1, 300, 500, 900)] == \
        [0.0, 0.001, 0.3, 0.5, 0.5]
    assert [old_policy_decay(u, start=75, rate=0.0075, maximum=0.999) for u in (0, 74, 75, 175, 400)] == \
        [0.0, 0.0, 0.0, 0.75, 0.999]


def test_nft_needs_a_flow_sampler(tmp_path):
    from types import SimpleNamespace

    from dancegrpo.samplers import DDIMSampler, scaled_linear_alphas_cumprod
    from dancegrpo.trainer.nft import NFTAlgorithm

    ddim = DDIMSampler(scaled_linear_alphas_cumprod(), 8, 1.0)
    stub = SimpleNamespace(cfg=nft_cfg(tmp_path), sampler=ddim, model=torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="algorithm=nft .* needs a flow sampler"):
        NFTAlgorithm(stub)


def test_config_rejects_bad_nft_values(tmp_path):
    with pytest.raises(ConfigError, match="algorithm must be one of"):
        nft_cfg(tmp_path, "algorithm=dpo")
    with pytest.raises(ConfigError, match="nft.decay_max must be < 1"):
        nft_cfg(tmp_path, "nft.decay_max=1.0")
    with pytest.raises(ConfigError, match="nft.beta must be finite > 0"):
        nft_cfg(tmp_path, "nft.beta=0")
    with pytest.raises(ConfigError, match="rollout.share_noise must be false with algorithm=nft"):
        nft_cfg(tmp_path, "rollout.share_noise=true")
    nft_cfg(tmp_path, "rollout.share_noise=true", "nft.deterministic_rollout=false")  # SDE rollouts differ


def test_deterministic_rollouts_give_distinct_samples_and_nonzero_advantages(tmp_path):
    tr = Trainer(nft_cfg(tmp_path, "max_steps=1"))
    m = tr.train_step()
    assert m["adv_zero_frac"] < 0.5 and m["adv_std"] > 0


def test_update_on_a_fixed_batch_lowers_the_loss_and_pulls_toward_positive_samples(tmp_path):
    """Repeated updates on one fixed batch (old policy frozen): the NFT loss falls, and the
    policy's velocity at the positive samples moves toward their flow-matching target."""
    tr = Trainer(nft_cfg(tmp_path, "max_steps=1", "optim.lr=1e-2", "optim.max_grad_norm=0"))
    nft = tr.nft
    g = torch.Generator().manual_seed(0)
    B = 8
    x0 = torch.randn((B, *tr.model.latent_shape()), generator=g)
    items = tr.dataset.sample(2, generator=tr.generators["data"])
    from dancegrpo.models.interface import repeat
    from dancegrpo.trainer.rollout import encode_items

    _, cond = encode_items(tr.model, items, tr.device)
    cond = repeat(cond, 4)
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    steps = torch.full((B, 1), 4, dtype=torch.long)

    def probe():
        """|v - target| at the positive samples on fixed noise, and the loss on that batch."""
        t = tr.sampler.sigma(torch.tensor(4)).float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        xt = (1 - t) * x0 + t * noise
        with torch.no_grad():
            v = tr.model.predict(xt, tr.sampler.model_timesteps(torch.full((B,), 4)), cond)
        return float((v - (noise - x0))[:4].pow(2).mean())

    before = probe()
    losses = []
    for _ in range(15):
        nft.noise = torch.Generator().manual_seed(3)  # the same noise draws every pass: a fixed batch
        tr.generators["data"].manual_seed(3)
        stats = nft.update(x0, cond, r, steps)
        losses.append(stats.summary()["loss"])
    after = probe()
    assert losses[-1] < losses[0]
    assert after < before


def test_old_policy_follows_the_soft_update_and_drives_rollouts(tmp_path, monkeypatch):
    tr = Trainer(nft_cfg(tmp_path, "max_steps=1"))
    nft = tr.nft
    name, p = nft.named[0]
    old0 = nft.old[name].clone()
    with torch.no_grad():
        p.add_(1.0)
    nft.updates = 3  # decay 0.1 * 3 = 0.3
    assert nft.soft_update() == pytest.approx(0.3)
    torch.testing.assert_close(nft.old[name], 0.3 * old0 + 0.7 * p.detach())
    old, current = nft.old[name].clone(), p.detach().clone()
    with nft.old_weights():  # swapped in, then back
        assert torch.equal(p.detach(), old)
    assert torch.equal(p.detach(), current) and torch.equal(nft.old[name], old)
    # the rollout runs with the old policy's weights, the update trains the current ones
    import dancegrpo.trainer.nft as nft_module

    seen = []
    real = nft_module.collect_rollout

    def spy(model, *args, **kwargs):
        seen.append(dict(model.named_parameters())[name].detach().clone())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(nft_module, "collect_rollout", spy)
    tr.train_step()
    assert torch.equal(seen[0], old)
    assert not torch.equal(p.detach(), current)  # trained


def test_nft_resume_is_exact(tmp_path):
    full = Trainer(nft_cfg(tmp_path / "full", "max_steps=4"))
    full.train()
    Trainer(nft_cfg(tmp_path / "part", "max_steps=2")).train()
    resumed = Trainer(nft_cfg(tmp_path / "part", "max_steps=4", "resume=true"))
    assert resumed.step == 2 and resumed.nft.updates == full.nft.updates // 2
    resumed.train()
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    for key in ("loss", "reward_mean", "grad_norm", "nft_positive_loss", "nft_old_decay"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert all(torch.equal(full.nft.old[n], resumed.nft.old[n]) for n in full.nft.old)


def test_resuming_a_grpo_checkpoint_as_nft_is_refused(tmp_path):
    cfg = load_config(CONFIGS / "toy.yaml", [f"output_dir={tmp_path}", "log.progress=false", "max_steps=1",
                                             "log.num_sample_prompts=0", "log.sample_every=0"])
    Trainer(cfg).train()
    with pytest.raises(ConfigError, match="has no DiffusionNFT old policy"):
        Trainer(nft_cfg(tmp_path, "max_steps=2", "resume=true"))


def test_shapes_nft_config_trains_through_the_cli(tmp_path):
    from dancegrpo.cli import main

    out = tmp_path / "run"
    code = main(["train", "shapes_t2i_nft", f"output_dir={out}", "max_steps=2", "log.progress=false",
                 "log.num_sample_prompts=2", "log.sample_every=0", "rollout.prompts_per_step=2",
                 "rollout.group_size=4", "optim.train_batch_size=4", "optim.gradient_accumulation_steps=1",
                 "nft.timestep_fraction=0.125", "eval.num_prompts=2"])
    assert code in (0, None)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["optimizer_steps"] == 2 and r["loss"] == r["loss"] for r in rows)
    assert (out / "checkpoints" / "step_00000002" / "old_policy.safetensors").is_file()
