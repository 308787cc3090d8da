"""The shipped algorithm configs on the shapes world, and what they share: NFE accounting, the
held-out over-optimisation guard, Flow-GRPO-Fast's random window, GRPO-Guard in training."""

import json
import math

import pytest
import torch
from PIL import Image

from dancegrpo.cli import main
from dancegrpo.trainer.config import load_config
from dancegrpo.trainer.evaluate import HeldoutEval
from dancegrpo.trainer.images import save_reward_curve
from dancegrpo.trainer.loop import Trainer
from dancegrpo.trainer.timesteps import TimestepSelector

ALGORITHMS = ("shapes_t2i", "shapes_t2i_flowgrpo", "shapes_t2i_flowgrpo_fast", "shapes_t2i_mixgrpo",
              "shapes_t2i_mixgrpo_flash")
# A few samples, the configs' own sampler (16 steps) and algorithm settings.
TINY = ["device=cpu", "log.progress=false", "log.tensorboard=false", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "optim.train_batch_size=4", "optim.gradient_accumulation_steps=1",
        "log.num_sample_prompts=0", "log.sample_every=0", "checkpoint_every=0", "eval.num_prompts=4"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_algorithm_trains_through_the_cli(name, tmp_path):
    out = tmp_path / "run"
    assert main(["train", name, "max_steps=2", f"output_dir={out}", *TINY]) == 0
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert r["nfe"] == r["nfe_rollout"] + r["nfe_update"] and r["nfe_update"] > 0
        assert math.isfinite(r["loss"]) and r["optimizer_steps"] >= 1
    # the update's first forward sees the rollout's weights: ratio 1
    assert abs(logged[0]["ratio_first_update"] - 1) < 1e-4


def test_mixgrpo_flash_calls_the_model_less_than_mixgrpo(tmp_path):
    nfe = {}
    for name in ("shapes_t2i_mixgrpo", "shapes_t2i_mixgrpo_flash"):
        cfg = load_config(name, [*TINY, f"output_dir={tmp_path / name}", "max_steps=1"])
        m = Trainer(cfg).train_step()
        nfe[name] = (m["nfe_rollout"], m["nfe_update"])
    batch = 4
    assert nfe["shapes_t2i_mixgrpo"] == (16 * batch, 4 * batch)
    # window 0..3 as in MixGRPO; the 12 steps after it: int(0.4 * 13) - 1 = 4 DPM-Solver++ steps
    assert nfe["shapes_t2i_mixgrpo_flash"] == ((4 + 4) * batch, 4 * batch)


def test_heldout_guard_is_logged_and_plotted(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "shapes_t2i_flowgrpo_fast", "max_steps=2", f"output_dir={out}", *TINY,
                 "eval.every=2"]) == 0
    first, second = rows(out)
    assert not any(k.startswith("heldout/") for k in first)
    for key in ("heldout/reward_mean", "heldout/shapes_alignment", "heldout/shapes_alignment_heldout",
                "heldout/shapes_aesthetic", "heldout/correct_rate"):
        assert math.isfinite(second[key]), key
    assert 0 <= second["heldout/correct_rate"] <= 1
    assert (out / "reward_curve.png").is_file()


def test_heldout_eval_is_deterministic_and_separate_from_training(tmp_path):
    cfg = load_config("shapes_t2i_mixgrpo", [*TINY, f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    guard = HeldoutEval(cfg, trainer.rewards, "cpu")
    assert [r.weight for r in guard.rewards] == [1.0, 0.0, 0.0]  # held-out rewards never weigh in
    a, b = guard.evaluate(trainer.model, trainer.sampler), guard.evaluate(trainer.model, trainer.sampler)
    assert a == b
    with torch.no_grad():  # another policy scores differently on the same prompts and noise
        for p in trainer.params:
            p.add_(0.05 * torch.randn_like(p))
    assert guard.evaluate(trainer.model, trainer.sampler) != a


def test_a_trained_reward_is_refused_as_heldout(tmp_path):
    cfg = load_config("shapes_t2i", [*TINY, f"output_dir={tmp_path}", "eval.every=1",
                                     "eval.heldout_rewards=[{name: shapes_alignment, kwargs: {attributes: [color, shape]}}]"])
    with pytest.raises(ValueError, match=r"eval.heldout_rewards.0 \('shapes_alignment'\) is a trained reward"):
        Trainer(cfg)


def test_reward_curve_draws_the_heldout_series(tmp_path):
    path = save_reward_curve([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], tmp_path / "c.png",
                             extra={"heldout/x": [None, 0.5, None, 0.1]})
    colours = lambda p: {c for _, c in Image.open(p).convert("RGB").getcolors(maxcolors=1 << 20)}
    pixels = colours(path)
    assert (20, 140, 60) in pixels  # the first extra series' colour
    plain = colours(save_reward_curve([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], tmp_path / "d.png"))
    assert (20, 140, 60) not in plain


def test_random_window_draws_a_window_per_iteration():
    sel = TimestepSelector("random_window", torch.ones(16, dtype=torch.bool), window_size=2, window_range=[0, 8],
                           seed=3)
    starts = []
    for it in range(40):
        mask = sel.sde_mask(it)
        start = int(mask.nonzero()[0])
        assert mask.sum() == 2 and bool(mask[start:start + 2].all()) and 0 <= start < 8
        starts.append(start)
    assert len(set(starts)) >= 5  # it moves, unlike a fixed window
    again = TimestepSelector("random_window", torch.ones(16, dtype=torch.bool), window_size=2, window_range=[0, 8],
                             seed=3)
    assert [int(again.sde_mask(it).nonzero()[0]) for it in range(40)] == starts  # a function of (seed, iteration)
    steps = sel.choose(sel.sde_mask(0), 3, torch.Generator().manual_seed(0))
    assert steps.shape == (3, 2)
    with pytest.raises(ValueError, match="window_range must be"):
        TimestepSelector("random_window", torch.ones(16, dtype=torch.bool), window_size=2, window_range=[4, 15])


def test_ratio_norm_trains_with_ratio_one_at_the_first_update(tmp_path):
    cfg = load_config("shapes_t2i_mixgrpo", [*TINY, f"output_dir={tmp_path}", "loss.ratio_norm=true"])
    trainer = Trainer(cfg)
    m = trainer.train_step()
    assert abs(m["ratio_first_update"] - 1) < 1e-6 and math.isfinite(m["loss"]) and m["optimizer_steps"] == 1
