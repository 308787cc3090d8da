"""SD 1.x / 2.x specifics: v-prediction UNets, the negative prompt, and the two DDIM schedules
(the scheduler's own spacing vs our leading spacing on the model's alpha-bars)."""

import pytest
import torch
from diffusers_fixtures import MODEL, PROMPTS, load_pipeline, run_pipeline, tiny_pipeline

from dancegrpo.registry import build_model
from dancegrpo.samplers import DDIMSampler, build_sampler
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

STEPS = 4


def _ours(folder, family="sd", **overrides):
    model = build_model("sd", path=str(folder), **{**MODEL[family][1], **overrides})
    sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=1.0)
    r = collect_rollout(model, sampler, [TextPrompt(p) for p in PROMPTS[:2]], 1, torch.zeros(STEPS, dtype=torch.bool),
                        torch.Generator().manual_seed(5), device="cpu", decode="final")
    return model, r.latents[:, 0], r.latents[:, -1]


@pytest.mark.parametrize("family, overrides", [("sd_v", {}), ("sd", {"negative_prompt": "blurry"}),
                                               ("sd", {"guidance_scale": 1.0})],
                         ids=["v_prediction", "negative_prompt", "no_cfg"])
def test_options_match_the_pipeline(tmp_path_factory, family, overrides):
    folder = tiny_pipeline(family, tmp_path_factory)
    model, x0, ours = _ours(folder, family, **overrides)
    assert model.v_prediction == (family == "sd_v")
    pipe = load_pipeline(family, folder)
    ref = run_pipeline(family, pipe, PROMPTS[:2], x0, STEPS, **overrides)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if overrides:
        default = run_pipeline(family, pipe, PROMPTS[:2], x0, STEPS)
        assert (ref - default).abs().max() > 1e-4  # the option changes the result


def test_ddim_kind_uses_the_models_alpha_bars(tmp_path_factory):
    model = build_model("sd", path=str(tiny_pipeline("sd", tmp_path_factory)), **MODEL["sd"][1])
    own = build_sampler("scheduler", model, num_steps=STEPS, eta=1.0)
    ours = build_sampler("ddim", model, num_steps=STEPS, eta=1.0)
    assert isinstance(own, DDIMSampler) and isinstance(ours, DDIMSampler)
    torch.testing.assert_close(ours.alphas_cumprod, own.alphas_cumprod, rtol=0, atol=0)
    # the tiny scheduler uses SD's leading spacing with steps_offset 1: the same timesteps
    assert torch.equal(ours.timesteps, own.timesteps)
    pipe = load_pipeline("sd", tiny_pipeline("sd", tmp_path_factory))
    pipe.scheduler.set_timesteps(STEPS)
    assert torch.equal(own.timesteps, pipe.scheduler.timesteps)
