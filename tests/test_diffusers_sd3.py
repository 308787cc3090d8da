"""SD3 specifics: the negative prompt and guidance_scale <= 1 (no CFG) mean what the pipeline
means; the unconditional half runs in the same forward as the conditional one."""

import pytest
import torch
from diffusers_fixtures import MODEL, PROMPTS, load_pipeline, run_pipeline, tiny_pipeline

from dancegrpo.registry import build_model
from dancegrpo.samplers import build_sampler
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline("sd3", tmp_path_factory)


def _ours(folder, **overrides):
    model = build_model("sd3", path=str(folder), **{**MODEL["sd3"][1], **overrides})
    sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=0.7)
    r = collect_rollout(model, sampler, [TextPrompt(p) for p in PROMPTS[:2]], 1, torch.zeros(STEPS, dtype=torch.bool),
                        torch.Generator().manual_seed(3), device="cpu", decode="final")
    return model, r.latents[:, 0], r.latents[:, -1]


@pytest.mark.parametrize("overrides", [{"negative_prompt": "blurry"}, {"guidance_scale": 1.0}],
                         ids=["negative_prompt", "no_cfg"])
def test_guidance_options_match_the_pipeline(folder, overrides):
    _, x0, ours = _ours(folder, **overrides)
    pipe = load_pipeline("sd3", folder)
    ref = run_pipeline("sd3", pipe, PROMPTS[:2], x0, STEPS, **overrides)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    default = run_pipeline("sd3", pipe, PROMPTS[:2], x0, STEPS)
    assert (ref - default).abs().max() > 1e-4  # the option changes the result


def test_cfg_is_one_batched_forward(folder):
    model, x0, _ = _ours(folder)
    batches = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]),
                                                with_kwargs=True)
    with torch.no_grad():
        model.predict(x0, torch.full((2,), 500.0), model.encode_prompts(PROMPTS[:2]))
    assert batches == [4]
