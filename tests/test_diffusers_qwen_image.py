"""Qwen-Image specifics: true CFG (negative prompt, norm rescale, guidance_scale <= 1 turns it off)
on prompts of different lengths, one batched forward with padded text, its resolution-dependent
schedule with the terminal shift, and decoding through its 3D VAE's latent statistics."""

import pytest
import torch
from diffusers_fixtures import MODEL, PROMPTS, load_pipeline, run_pipeline, tiny_pipeline

from dancegrpo.models.diffusers.flux import pack
from dancegrpo.registry import build_model
from dancegrpo.samplers import build_sampler
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

STEPS = 3
UNEQUAL = PROMPTS[2:4]  # 3 and 4 words: their text is padded and masked in one batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline("qwen_image", tmp_path_factory)


def _model(folder, **overrides):
    return build_model("qwen_image", path=str(folder), **{**MODEL["qwen_image"][1], **overrides})


def _ours(folder, prompts=UNEQUAL, **overrides):
    model = _model(folder, **overrides)
    sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3)
    r = collect_rollout(model, sampler, [TextPrompt(p) for p in prompts], 1, torch.zeros(STEPS, dtype=torch.bool),
                        torch.Generator().manual_seed(3), device="cpu", decode="final")
    return model, r


def test_the_prompt_survives_the_template_drop(folder):
    """The fixture's tokenizer makes the pipeline keep each prompt's own tokens (plus the
    template's 5-token tail), so parity compares different conditionings."""
    cond = _model(folder).encode_prompts(UNEQUAL)
    assert cond["prompt_mask"].sum(1).tolist() == [3 + 5, 4 + 5]
    assert not torch.allclose(cond["prompt_embeds"][0, :3], cond["prompt_embeds"][1, :3])


@pytest.mark.parametrize("overrides", [{}, {"negative_prompt": "blurry"}, {"guidance_scale": 1.0}],
                         ids=["default", "negative_prompt", "no_cfg"])
def test_guidance_options_match_the_pipeline(folder, overrides):
    _, r = _ours(folder, **overrides)
    x0, ours = r.latents[:, 0], r.latents[:, -1]
    pipe = load_pipeline("qwen_image", folder)
    ref = run_pipeline("qwen_image", pipe, UNEQUAL, x0, STEPS, **overrides)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    if overrides:
        default = run_pipeline("qwen_image", pipe, UNEQUAL, x0, STEPS)
        assert (ref - default).abs().max() > 1e-4  # the option changes the result


def test_cfg_is_one_batched_forward_with_masked_padding(folder):
    model = _model(folder, negative_prompt="blurry")
    seen = []
    model.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"].shape[0], kw["encoder_hidden_states_mask"])),
        with_kwargs=True)
    x = torch.randn(2, *model.latent_shape())
    with torch.no_grad():
        model.predict(x, torch.full((2,), 500.0), model.encode_prompts(UNEQUAL))
    ((batch, mask),) = seen
    assert batch == 4
    assert mask.sum(1).tolist() == [1 + 5, 1 + 5, 3 + 5, 4 + 5]  # negative half first, padding masked


def test_decode_matches_the_pipeline_pixels(folder):
    model, r = _ours(folder)
    x0 = r.latents[:, 0]
    pipe = load_pipeline("qwen_image", folder)
    kw = MODEL["qwen_image"][1]
    ref = pipe(list(UNEQUAL), negative_prompt=" ", true_cfg_scale=kw["guidance_scale"], height=16, width=16,
               num_inference_steps=STEPS, latents=pack(x0), max_sequence_length=kw["max_sequence_length"],
               output_type="pt").images
    torch.testing.assert_close(r.samples, ref, rtol=1e-5, atol=1e-5)
    stats = pipe.vae.config
    assert stats.latents_std != [1.0] * len(stats.latents_std)  # the statistics are exercised


def test_schedule_follows_the_pipeline_at_each_resolution(folder):
    sigmas = {}
    pipe = load_pipeline("qwen_image", folder)
    for size in (16, 32):
        model = _model(folder, height=size, width=size)
        sampler = build_sampler("scheduler", model, num_steps=5, eta=0.3)
        pipe("a red circle", height=size, width=size, num_inference_steps=5, max_sequence_length=16,
             output_type="latent")
        torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas.double(), rtol=0, atol=0)
        torch.testing.assert_close(sampler.model_timesteps(torch.arange(5)), pipe.scheduler.timesteps, rtol=0, atol=0)
        sigmas[size] = sampler.sigmas
    assert sigmas[16][-2].item() == pytest.approx(0.02)  # the scheduler's terminal shift
    assert (sigmas[32][1:-2] > sigmas[16][1:-2]).all()  # more tokens: a larger mu shifts towards noise


def test_option_mistakes_are_one_line(folder):
    with pytest.raises(ValueError, match="model.kwargs.max_sequence_length must be <= 1024"):
        _model(folder, max_sequence_length=2048)
    with pytest.raises(ValueError, match="model.kwargs.negative_prompt must be a string"):
        _model(folder, negative_prompt=None)
