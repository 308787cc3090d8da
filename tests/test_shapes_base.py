"""The shipped shapes base models: they load, follow the interface, and keep their measured
held-out quality (a regression guard for the assets, the sampler, the renderer and the detector)."""

import json

import pytest
import torch

from dancegrpo.models.interface import GenerativeModel
from dancegrpo.trainer.config import load_config
from dancegrpo.trainer.evaluate import generate
from dancegrpo.trainer.policy import build_run_sampler
from dancegrpo.worlds.shapes.dataset import PromptDataset
from dancegrpo.worlds.shapes.grammar import sample_specs
from dancegrpo.worlds.shapes.policy import TASKS, base_model_path, build_policy
from dancegrpo.worlds.shapes.pretrain import CONFIGS, evaluate
from dancegrpo.worlds.shapes.renderer import render_batch
from dancegrpo.worlds.shapes.rewards import AlignmentReward


@pytest.mark.parametrize("task", TASKS)
def test_base_model_loads_and_predicts(task):
    model = build_policy(task)
    assert isinstance(model, GenerativeModel)
    assert (base_model_path(task) / "eval.json").is_file()
    g = torch.Generator().manual_seed(0)
    specs = sample_specs(2, g, video=task != "t2i")
    images = render_batch(specs, 32, video=True, frames=8, generator=g)[:, :, 0] if task == "i2v" else None
    cond = model.encode_prompts([s.prompt for s in specs], images)
    x = torch.randn(2, *model.latent_shape(), generator=g)
    with torch.no_grad():
        v = model.predict(x, torch.full((2,), 500.0), cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="task"):
        build_policy(task, pretrained=str(base_model_path("t2i" if task != "t2i" else "t2v")))


def test_t2i_base_reproduces_its_eval_json():
    """eval.json is the evaluation of configs/shapes_t2i.yaml (the demo's "before" column):
    128 fixed held-out prompts, deterministic 16-step sampler. Bit-identical on the CPU and
    torch build that wrote it (46.9% colour and shape right); elsewhere float rounding may flip
    a borderline sample or two, hence 2 of 128."""
    want = json.loads((base_model_path("t2i") / "eval.json").read_text())
    assert want["task"] == "t2i" and want["num_prompts"] == 128
    got = evaluate(build_policy("t2i"), num_prompts=want["num_prompts"])
    assert abs(got["correct_rate"] - want["correct_rate"]) <= 2 / 128, (got["correct_rate"], want["correct_rate"])
    assert abs(got["reward_mean"] - want["reward_mean"]) <= 0.01, (got["reward_mean"], want["reward_mean"])


def _video_samples(task):
    """The first 16 prompts of the task config's evaluation, sampled as it samples them, and
    the i2v first frames of those prompts."""
    cfg = load_config(CONFIGS / f"shapes_{task}.yaml")
    model = build_policy(task)
    items = PromptDataset(task, split="heldout").fixed(16)
    samples, prompts = generate(model, build_run_sampler(cfg, model), items, mode=cfg.eval.mode, seed=cfg.eval.seed)
    first = torch.stack([it.image for it in PromptDataset("i2v", split="heldout").fixed(16)])
    return samples, prompts, first


def test_t2v_base_quality_regression():
    """The shipped T2V base draws the asked colour at the asked place (measured 0.875 on these
    16 prompts) in every frame. Its shapes and motion are not learned yet (README), so only
    colour and position are guarded."""
    samples, prompts, _ = _video_samples("t2v")
    assert samples.shape == (16, 3, 8, 32, 32)
    rate = float(AlignmentReward(("color", "position")).correct(samples, prompts).float().mean())
    assert rate >= 0.5, rate


def test_i2v_base_quality_regression():
    """The shipped I2V base starts its clips at the given frame: frame-0 MSE to it measured
    0.0037 on these 16 prompts (the T2V model, which does not see the frame: 0.0060), colour
    and position right on all 16. Caveat (README): given a frame that contradicts its prompt,
    it follows the prompt, so the bound is a regression guard, not proof of conditioning."""
    samples, prompts, first = _video_samples("i2v")
    mse = float((samples[:, :, 0] - first).pow(2).mean())
    assert mse < 0.005, mse
    rate = float(AlignmentReward(("color", "position")).correct(samples, prompts).float().mean())
    assert rate >= 0.75, rate
