"""The GRPO trainer on the toy world: learning, end-to-end runs, rollouts, timesteps, robustness."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dancegrpo import step_logprob
from dancegrpo.samplers import FlowSampler
from dancegrpo.trainer import Trainer, load_config
from dancegrpo.trainer.loop import select_best_of_k
from dancegrpo.trainer.rollout import collect_rollout
from dancegrpo.trainer.timesteps import TimestepSelector
from dancegrpo.trainer.update import RatioCheckWarning
from dancegrpo.worlds.toy import ToyColourReward, ToyModel, ToyPromptDataset, build_toy_model

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


def toy_cfg(tmp_path, *overrides):
    return load_config(CONFIGS / "toy.yaml", [f"output_dir={tmp_path}", "log.progress=false", "checkpoint_every=0",
                                              "log.num_sample_prompts=0", "log.sample_every=0", *overrides])


def test_toy_grpo_raises_the_reward(tmp_path):
    """50 GRPO steps (about 2 s): the mean reward of the last 10 steps clearly beats the first 10."""
    history = Trainer(toy_cfg(tmp_path, "max_steps=50")).train()
    rewards = [m["reward_mean"] for m in history]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last - first > 0.08, (first, last)
    assert all(abs(m["ratio_first_update"] - 1) < 1e-5 for m in history)


REQUIRED = ("step", "reward_mean", "loss", "ratio_first_update", "clip_fraction", "grad_norm", "skipped",
            "reward_std", "reward_toy_mean", "reward_toy_std", "adv_mean", "adv_std", "approx_kl",
            "time_rollout", "time_reward", "time_update", "samples_per_s", "peak_memory_mb")


@pytest.mark.parametrize("task", ["t2i", "t2v", "i2v"])
def test_end_to_end_short_run(tmp_path, task):
    cfg = toy_cfg(tmp_path, "max_steps=2", f"model.kwargs.task={task}", f"data.kwargs.task={task}",
                  "log.sample_every=1", "log.num_sample_prompts=4", "checkpoint_every=1")
    history = Trainer(cfg).train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and len(history) == 2
    for key in REQUIRED:
        assert key in lines[-1], key
    assert lines[-1]["skipped"] == 0 and lines[-1]["loss"] is not None
    suffix = ".png" if task == "t2i" else ".gif"
    assert (tmp_path / "samples" / f"step_000002{suffix}").is_file()
    assert (tmp_path / "reward_curve.png").is_file()
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert load_config(tmp_path / "config.yaml") == cfg


def test_rollout_keeps_a_consistent_trajectory(seed):
    model = build_toy_model(hidden=16)
    sampler = FlowSampler(6, eta=0.8)
    items = ToyPromptDataset().sample(3, torch.Generator().manual_seed(seed))
    mask = torch.tensor([False, True, True, True, False, True])
    r = collect_rollout(model, sampler, items, 4, mask, torch.Generator().manual_seed(seed), device="cpu")
    assert r.latents.shape == (12, 7, 3, 2, 2) and r.log_probs.shape == (12, 6) and r.samples.shape == (12, 3, 2, 2)
    # shared noise: the same x_0 within a group, different across groups
    x0 = r.latents[:, 0].flatten(1)
    assert torch.equal(x0[0], x0[3]) and not torch.equal(x0[0], x0[4])
    # ODE steps: no log-prob, std 0, y = x + d v; SDE steps: log-prob recomputes exactly
    cond = r.cond
    for i in range(6):
        x, y = r.latents[:, i], r.latents[:, i + 1]
        with torch.no_grad():
            v = model.predict(x, r.timesteps[:, i], cond)
        if mask[i]:
            c = sampler.coeffs(i, 12)
            assert torch.allclose(step_logprob(v, x, y, c), r.log_probs[:, i], atol=1e-5)
            assert torch.allclose(r.std[:, i], c.std)
        else:
            assert torch.isnan(r.log_probs[:, i]).all() and (r.std[:, i] == 0).all()
            assert torch.allclose(y, sampler.ode_step(i, x, v), atol=1e-6)
    # decoded samples are the last step's x0 prediction
    with torch.no_grad():
        v = model.predict(r.latents[:, 5], r.timesteps[:, 5], cond)
    assert torch.allclose(r.samples, model.decode(sampler.x0(5, r.latents[:, 5], v)), atol=1e-6)


def test_timestep_selection_strategies(seed):
    g = torch.Generator().manual_seed(seed)
    stoch = torch.ones(10, dtype=torch.bool)
    dance = TimestepSelector("dance", stoch, fraction=0.6)
    steps = dance.choose(dance.sde_mask(0), 64, g)
    assert steps.shape == (64, 5)  # int(0.6 * 9): the last step is dropped first
    assert int(steps.max()) <= 8 and all(len(set(row.tolist())) == 5 for row in steps)
    assert torch.equal(steps, steps.sort(1).values) and len({tuple(r.tolist()) for r in steps}) > 1
    full = TimestepSelector("all", stoch)
    assert torch.equal(full.choose(full.sde_mask(0), 2, g), torch.arange(9).expand(2, 9))
    win = TimestepSelector("window", stoch, window_size=3, window_stride=2, window_shift_every=5)
    assert win.sde_mask(0).nonzero().flatten().tolist() == [0, 1, 2]
    assert win.sde_mask(4).nonzero().flatten().tolist() == [0, 1, 2]
    assert win.sde_mask(5).nonzero().flatten().tolist() == [2, 3, 4]
    assert win.sde_mask(20).nonzero().flatten().tolist() == [1, 2, 3]  # (4 * 2) % 7 = 1: wraps
    assert win.choose(win.sde_mask(5), 3, g).tolist() == [[2, 3, 4]] * 3
    # a sampler whose last step is deterministic (CPS) still never trains the last step
    cps = torch.tensor([True] * 9 + [False])
    assert int(TimestepSelector("all", cps).choose(cps, 1, g).max()) == 8
    with pytest.raises(ValueError, match="no trainable step"):
        TimestepSelector("all", torch.zeros(10, dtype=torch.bool))


def test_best_of_k_keeps_top_and_bottom():
    adv = torch.tensor([0.1, 2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 0.2])
    valid = torch.ones(8, dtype=torch.bool)
    assert select_best_of_k(adv, valid, 4, 1).tolist() == [1, 2, 4, 5]
    valid[1] = False
    assert select_best_of_k(adv, valid, 4, 1).tolist() == [2, 3, 4, 5]
    assert select_best_of_k(adv, valid, 4, 2).tolist() == [0, 2, 3, 4, 5, 6, 7]


def test_best_of_k_run(tmp_path):
    history = Trainer(toy_cfg(tmp_path, "max_steps=2", "advantage.best_of_k=2")).train()
    assert all(m["trained_samples"] == 4 * 4 for m in history)


class FlakyReward(ToyColourReward):
    """Raises on any batch holding a 'red' prompt, and scores 'blue' samples NaN."""

    name = "flaky"

    def __call__(self, samples, prompts):
        if "red" in prompts:
            raise RuntimeError("reward model crashed on red")
        out = super().__call__(samples, prompts)
        return torch.where(torch.tensor([p == "blue" for p in prompts]), torch.nan, out)


def test_failing_reward_drops_samples_and_the_run_goes_on(tmp_path, caplog):
    cfg = toy_cfg(tmp_path, "max_steps=4", "rollout.prompts_per_step=8")
    trainer = Trainer(cfg, rewards=[FlakyReward()])
    with caplog.at_level("WARNING", logger="dancegrpo.trainer"):
        history = trainer.train()
    dropped = sum(m["dropped"] for m in history)
    assert dropped > 0 and dropped % 8 == 0  # whole groups of red / blue prompts
    assert any("failed on" in r.message for r in caplog.records)
    assert all(m["trained_samples"] == 64 - m["dropped"] for m in history)
    assert all(m["reward_mean"] is not None and m["reward_mean"] == m["reward_mean"] for m in history)


class RewardServerDown:
    """A reward whose every call fails (e.g. its service is unreachable)."""

    name = "remote_judge"

    def __call__(self, samples, prompts):
        raise ConnectionError("reward server at 10.0.0.7 refused the connection")


def test_reward_failing_on_every_sample_stops_the_run(tmp_path):
    from dancegrpo.errors import RewardError

    trainer = Trainer(toy_cfg(tmp_path, "max_steps=50", "max_invalid_steps=3"), rewards=[RewardServerDown()])
    with pytest.raises(RewardError, match=r"no sample had a valid reward in 3 steps in a row \(max_invalid_steps=3\)"
                                          r".*reward 'remote_judge': ConnectionError: reward server at 10.0.0.7"):
        trainer.train()
    assert trainer.step == 3 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_nonfinite_reward_everywhere_stops_and_zero_disables_the_check(tmp_path):
    from dancegrpo.errors import RewardError

    def always_nan(samples, prompts):
        return torch.full((samples.shape[0],), float("nan"))

    with pytest.raises(RewardError, match="reward 'always_nan': non-finite scores for 32/32 samples"):
        Trainer(toy_cfg(tmp_path / "a", "max_steps=10", "max_invalid_steps=2"), rewards=[always_nan]).train()
    history = Trainer(toy_cfg(tmp_path / "b", "max_steps=4", "max_invalid_steps=0"), rewards=[always_nan]).train()
    assert [m["trained_samples"] for m in history] == [0, 0, 0, 0]


def test_a_valid_step_resets_the_invalid_count(tmp_path):
    calls = {"n": 0}

    def every_third_works(samples, prompts):  # fails, fails, works, fails, fails, works...
        calls["n"] += 1
        if calls["n"] % 3:
            raise RuntimeError("flaky")
        return ToyColourReward()(samples, prompts)

    class Batched:  # one call per step (no per-sample retries), so the call count is the step count
        name = "batched"

        def __call__(self, samples, prompts):
            try:
                return every_third_works(samples, prompts)
            except RuntimeError:
                return torch.full((samples.shape[0],), float("nan"))

    history = Trainer(toy_cfg(tmp_path, "max_steps=9", "max_invalid_steps=3"), rewards=[Batched()]).train()
    assert [m["trained_samples"] > 0 for m in history] == [False, False, True] * 3


class Contrast:
    """A reward object with no ``name`` attribute."""

    def __call__(self, samples, prompts):
        return samples.flatten(1).std(1)


def brightness(samples, prompts):
    return samples.flatten(1).mean(1)


def test_custom_rewards_are_logged_by_their_names(tmp_path):
    history = Trainer(toy_cfg(tmp_path, "max_steps=1"), rewards=[brightness, Contrast(), Contrast(),
                                                                 ToyColourReward()]).train()
    keys = {k for k in history[0] if k.startswith("reward_") and k.endswith("_mean") and k != "reward_mean"}
    assert keys == {"reward_brightness_mean", "reward_Contrast_mean", "reward_Contrast_1_mean",
                    "reward_toy_colour_mean"}


class NaNInTraining(ToyModel):
    """Finite during rollouts (eval mode), NaN in the training forward."""

    def predict(self, latents, timesteps, cond):
        out = super().predict(latents, timesteps, cond)
        return out * float("nan") if self.training else out


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_nonfinite_loss_skips_update_and_keeps_weights(tmp_path):
    torch.manual_seed(0)
    model = NaNInTraining()
    before = _weights(model)
    trainer = Trainer(toy_cfg(tmp_path, "max_steps=2", "optim.ema_decay=0.9"), model=model)
    history = trainer.train()
    assert [m["skipped"] for m in history] == [4, 4]  # 4 micro-batches of 8, one optimizer step each
    assert history[-1]["skipped_total"] == 8 and all(m["optimizer_steps"] == 0 for m in history)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert trainer.optimizer.state_dict()["state"] == {}
    assert all(torch.equal(trainer.ema.shadow[n], before[n]) for n in trainer.ema.shadow)


def test_nonfinite_gradient_skips_update(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    before = _weights(model)
    model.net[0].weight.register_hook(lambda g: g * float("inf"))
    history = Trainer(toy_cfg(tmp_path, "max_steps=1"), model=model).train()
    assert history[0]["skipped"] == 4 and history[0]["loss"] is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class DropoutToy(ToyModel):
    """Output depends on train/eval mode: dropout on the velocity."""

    def predict(self, latents, timesteps, cond):
        return F.dropout(super().predict(latents, timesteps, cond), 0.3, training=self.training)


def test_ratio_check_fires_when_rollout_and_training_forwards_differ(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(RatioCheckWarning, match=r"train/eval mode"):
        history = Trainer(toy_cfg(tmp_path / "a", "max_steps=1"), model=DropoutToy()).train()
    assert abs(history[0]["ratio_first_update"] - 1) > 1e-3


def test_ratio_check_silent_when_forwards_match(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RatioCheckWarning)
        # the same dropout model, trained in eval mode: rollout and update agree again
        h1 = Trainer(toy_cfg(tmp_path / "b", "max_steps=2", "update_mode=eval"), model=DropoutToy()).train()
        h2 = Trainer(toy_cfg(tmp_path / "c", "max_steps=2", "rollout.batch_size=5")).train()
    for m in h1 + h2:
        assert abs(m["ratio_first_update"] - 1) < 1e-5


def test_kl_to_frozen_reference(tmp_path):
    trainer = Trainer(toy_cfg(tmp_path, "max_steps=3", "loss.kl_beta=0.05"))
    ref = trainer.updater.ref_predict.module
    ref_before = _weights(ref)
    history = trainer.train()
    assert all("kl" in m and m["kl"] >= 0 for m in history)
    assert history[-1]["kl"] > 0  # the policy moved away from the reference
    assert all(torch.equal(v, ref_before[k]) for k, v in ref.state_dict().items())


def test_bf16_autocast_keeps_ratio_one(tmp_path):
    history = Trainer(toy_cfg(tmp_path, "max_steps=2", "mixed_precision=bf16", "rollout.store_on_cpu=true")).train()
    assert all(abs(m["ratio_first_update"] - 1) < 1e-5 and m["loss"] is not None for m in history)


def test_ema_is_tracked_and_saved(tmp_path):
    trainer = Trainer(toy_cfg(tmp_path, "max_steps=2", "optim.ema_decay=0.5"))
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(trainer.ema.shadow[n], params[n].detach()) for n in params)
    assert (tmp_path / "checkpoints" / "step_00000002" / "ema.safetensors").is_file()


def test_lora_trains_only_adapters(tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(toy_cfg(tmp_path, "max_steps=2", "lora.enabled=true", "lora.rank=4", "loss.kl_beta=0.01"))
    base = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora = {n: p.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert base and lora and all("lora_" in n for n in lora)
    history = trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in base.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())
    assert history[-1]["kl"] > 0
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert set(saved) == set(lora)


def test_existing_run_without_resume_is_refused(tmp_path):
    Trainer(toy_cfg(tmp_path, "max_steps=1")).train()
    with pytest.raises(ValueError, match="resume=true"):
        Trainer(toy_cfg(tmp_path, "max_steps=2"))


class EpsilonToy(ToyModel):
    """The toy network read as an epsilon predictor (an SD-style model) for the DDIM path."""

    prediction = "epsilon"


def test_ddim_epsilon_model_trains(tmp_path):
    torch.manual_seed(0)
    cfg = toy_cfg(tmp_path, "max_steps=2", "sampler.kind=ddim", "sampler.num_steps=8", "sampler.eta=1.0",
                  "timesteps.strategy=all")
    trainer = Trainer(cfg, model=EpsilonToy())
    assert type(trainer.sampler).__name__ == "DDIMSampler"
    history = trainer.train()
    assert all(abs(m["ratio_first_update"] - 1) < 1e-5 and m["trained_steps"] == 7 for m in history)
    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        Trainer(toy_cfg(tmp_path / "x", "sampler.kind=flow"), model=EpsilonToy())


def test_window_strategy_rolls_out_ode_outside_the_window(tmp_path):
    cfg = toy_cfg(tmp_path, "max_steps=2", "timesteps.strategy=window", "timesteps.window_size=2",
                  "timesteps.window_shift_every=1")
    history = Trainer(cfg).train()
    assert [m["trained_steps"] for m in history] == [2, 2]
