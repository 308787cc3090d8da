"""``rollout.async_rewards``: chunk k is scored in a thread while chunk k+1 rolls out, in the same
training step, with the numbers of synchronous scoring (same noise, same rewards, same update)."""

import threading
from pathlib import Path

import pytest
import torch
from test_reward_server import remote_spec, serving, toy_cfg

from dancegrpo.errors import ConfigError
from dancegrpo.trainer import Trainer, load_config
from dancegrpo.trainer.scoring import AsyncScorer, WeightedReward, score_samples

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"
KEYS = ("reward_mean", "reward_std", "adv_mean", "adv_std", "adv_abs_max", "loss", "grad_norm", "ratio_first_update",
        "approx_kl", "clip_fraction", "dropped")


def shapes_cfg(out, *overrides):
    return load_config(CONFIGS / "shapes_t2i.yaml", [
        f"output_dir={out}", "max_steps=2", "device=cpu", "log.progress=false", "log.sample_every=0",
        "log.num_sample_prompts=0", "checkpoint_every=0", "model.kwargs.pretrained=false", "model.kwargs.size=16",
        "data.kwargs.size=16", "rollout.prompts_per_step=2", "rollout.group_size=3", "rollout.batch_size=2",
        "sampler.num_steps=3", "optim.train_batch_size=3", "optim.gradient_accumulation_steps=1",
        "loss.backend=torch", *overrides])


def run(cfg, **objects):
    trainer = Trainer(cfg, **objects)
    history = trainer.train()
    return history, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_async_equals_sync_on_the_shapes_world(tmp_path):
    """Chunks of 2 over 6 samples (the last chunk short): rewards, advantages, losses and the
    updated weights are bitwise those of scoring after the rollout."""
    sync, w_sync = run(shapes_cfg(tmp_path / "sync"))
    asyn, w_async = run(shapes_cfg(tmp_path / "async", "rollout.async_rewards=true"))
    assert [[m[k] for k in KEYS] for m in asyn] == [[m[k] for k in KEYS] for m in sync]
    reward_keys = [k for k in sync[0] if k.startswith("reward_") and k.endswith("_mean")]
    assert len(reward_keys) >= 2 and [[m[k] for k in reward_keys] for m in asyn] == \
        [[m[k] for k in reward_keys] for m in sync]
    assert w_sync.keys() == w_async.keys() and all(torch.equal(w_sync[k], w_async[k]) for k in w_sync)
    first = run(shapes_cfg(tmp_path / "other", "max_steps=1", "seed=1"))[1]  # the weights do move with the data
    assert not all(torch.equal(first[k], w_sync[k]) for k in w_sync)


def test_async_through_a_real_reward_server_equals_sync(tmp_path):
    with serving("toy", tmp_path=tmp_path) as server:
        spec = remote_spec(server.url, dtype="float32")
        sync = Trainer(toy_cfg(tmp_path / "sync", "max_steps=2", "loss.backend=torch", "rollout.batch_size=3",
                               spec)).train()
        asyn = Trainer(toy_cfg(tmp_path / "async", "max_steps=2", "loss.backend=torch", "rollout.batch_size=3",
                               "rollout.async_rewards=true", spec)).train()
    assert [[m[k] for k in KEYS] for m in asyn] == [[m[k] for k in KEYS] for m in sync]
    assert [m["reward_remote_mean"] for m in asyn] == [m["reward_remote_mean"] for m in sync]


STEPS, CHUNKS = 8, 4  # the toy config's sampler steps; 2 prompts x 4 samples in chunks of 2


class Handshake:
    """Makes the overlap observable without clocks. The policy's first call for chunk c waits
    until the scoring of chunk c - 1 has started; the scoring of chunk k (not the last) waits
    until the policy has run for chunk k + 1. Scoring after the rollout cannot satisfy the first
    wait: the guard time-out then records it, and the order assertions fail."""

    def __init__(self):
        self.events, self.cond, self.predicts, self.started = [], threading.Condition(), 0, 0

    def reward(self, samples, prompts):
        with self.cond:
            self.started += 1
            k = self.started
            self.events.append(f"score_start_{k}")
            self.cond.notify_all()
            if k < CHUNKS:
                self.cond.wait_for(lambda: self.predicts > STEPS * k, timeout=20)
            self.events.append(f"score_end_{k}")
        return samples.float().mean(dim=(1, 2, 3))

    def before_predict(self):
        with self.cond:
            chunk = self.predicts // STEPS
            if self.predicts % STEPS == 0 and chunk >= 1:
                if not self.cond.wait_for(lambda: self.started >= chunk, timeout=20):
                    self.events.append("no_overlap")
            self.predicts += 1
            self.events.append(f"predict_{self.predicts}")
            self.cond.notify_all()


def test_scoring_overlaps_the_next_chunk(tmp_path):
    hs = Handshake()
    hs.reward.__func__.name = "slow"
    trainer = Trainer(toy_cfg(tmp_path, "max_steps=1", "rollout.batch_size=2", "rollout.async_rewards=true",
                              "loss.backend=torch"), rewards=[hs.reward])
    predict = trainer.model.predict

    def traced(x, t, cond):
        hs.before_predict()
        return predict(x, t, cond)

    trainer.model.predict = traced
    trainer.train_step()
    ev = hs.events
    assert "no_overlap" not in ev and hs.started == CHUNKS and hs.predicts >= CHUNKS * STEPS, ev  # + the update's
    for k in range(1, CHUNKS):  # chunk k's scoring starts before chunk k + 1 rolls out and ends after
        first_next = ev.index(f"predict_{STEPS * k + 1}")
        assert ev.index(f"score_start_{k}") < first_next < ev.index(f"score_end_{k}"), ev
    assert ev.index(f"score_start_{CHUNKS}") > ev.index(f"predict_{CHUNKS * STEPS}")


def test_async_scorer_gathers_in_order_and_keeps_failures():
    calls = []

    def picky(samples, prompts):
        calls.append(len(prompts))
        if "bad" in prompts:
            raise ValueError("no")
        return torch.arange(len(prompts), dtype=torch.float32) + samples[:, 0, 0, 0]

    rewards = [WeightedReward(picky, 1.0, "picky")]
    x = torch.rand(5, 3, 2, 2)
    prompts = ["a", "b", "bad", "c", "d"]
    with AsyncScorer(rewards) as scorer:
        for sl in (slice(0, 2), slice(2, 4), slice(4, 5)):
            scorer.submit(sl, x[sl], prompts[sl])
        got = scorer.result()
    want = torch.cat([score_samples(rewards, x[sl], prompts[sl]).rewards for sl in (slice(0, 2), slice(2, 4),
                                                                                     slice(4, 5))])
    torch.testing.assert_close(got.rewards, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got.rewards[2, 0]) and torch.isfinite(got.rewards[[0, 1, 3, 4], 0]).all()
    assert got.failures == {"picky": "ValueError: no"} and len(got.errors) == 1


def test_async_rewards_needs_chunks(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.async_rewards.*rollout.batch_size > 0"):
        toy_cfg(tmp_path, "rollout.async_rewards=true")
    with pytest.raises(ConfigError, match=r"rollout.async_rewards"):
        toy_cfg(tmp_path, "rollout.async_rewards=3", "rollout.batch_size=2")
