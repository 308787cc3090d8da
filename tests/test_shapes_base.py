"""The shipped shapes base models: they load, follow the interface, and the T2I model keeps its
measured held-out quality on a fixed seed (a regression guard for the asset and the sampler)."""

import json

import pytest
import torch

from dancegrpo.models.interface import GenerativeModel
from dancegrpo.worlds.shapes.grammar import sample_specs
from dancegrpo.worlds.shapes.policy import TASKS, base_model_path, build_policy
from dancegrpo.worlds.shapes.pretrain import generate
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


def test_t2i_base_quality_regression():
    """Held-out colour+shape correctness of the shipped T2I base on a fixed seed.

    Measured 0.59 on these 32 prompts when the asset was made (eval.json holds the 256-prompt
    numbers; the previous, 4,500-step model scored 0.09 here): a broken asset, sampler,
    renderer or detector change drops it far below the bound, and a model that always follows
    its prompt (no headroom left for GRPO) would exceed it.
    """
    model = build_policy("t2i")
    g = torch.Generator().manual_seed(0)
    prompts = [s.prompt for s in sample_specs(32, g, split="heldout")]
    samples = generate(model, prompts, steps=16, eta=0.3, seed=1)
    rate = float(AlignmentReward(("color", "shape")).correct(samples, prompts).float().mean())
    assert 0.35 <= rate <= 0.85, rate
    stats = json.loads((base_model_path("t2i") / "eval.json").read_text())
    assert stats["task"] == "t2i" and stats["split"] == "heldout"


def _video_samples(task):
    model = build_policy(task)
    g = torch.Generator().manual_seed(0)
    specs = sample_specs(16, g, video=True, split="heldout")
    prompts = [s.prompt for s in specs]
    first = render_batch(specs, 32, frames=8, video=True)[:, :, 0] if task == "i2v" else None
    return generate(model, prompts, first, steps=16, eta=0.3, seed=1), prompts, first


def test_t2v_base_quality_regression():
    """The shipped T2V base draws the asked colour at the asked place (measured 0.75 on these
    16 prompts; 0.82 colour and 0.98 position on 128) in every frame. Its shapes and motion are
    not learned yet (README), so only colour and position are guarded."""
    samples, prompts, _ = _video_samples("t2v")
    assert samples.shape == (16, 3, 8, 32, 32)
    rate = float(AlignmentReward(("color", "position")).correct(samples, prompts).float().mean())
    assert rate >= 0.5, rate


def test_i2v_base_quality_regression():
    """The shipped I2V base starts its clips at the given frame: frame-0 MSE to it measured
    0.0034 on these 16 prompts (the T2V model, which does not see the frame: 0.0070), colour
    and position right on all 16. Caveat (README): given a frame that contradicts its prompt,
    it follows the prompt, so the bound is a regression guard, not proof of conditioning."""
    samples, prompts, first = _video_samples("i2v")
    mse = float((samples[:, :, 0] - first).pow(2).mean())
    assert mse < 0.006, mse
    rate = float(AlignmentReward(("color", "position")).correct(samples, prompts).float().mean())
    assert rate >= 0.75, rate
