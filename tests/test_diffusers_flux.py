"""FLUX specifics: 2x2 packing, token positions, the resolution-dependent schedule shift, and
the distilled guidance (no negative prompt)."""

import pytest
import torch
from diffusers import FluxPipeline
from diffusers_fixtures import MODEL, tiny_pipeline

from dancegrpo.models.diffusers.flux import image_ids, pack, unpack
from dancegrpo.registry import build_model
from dancegrpo.samplers import build_sampler


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline("flux", tmp_path_factory)


def test_packing_matches_the_pipeline_and_round_trips():
    x = torch.randn(2, 3, 6, 4)
    tokens = pack(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 3, 6, 4), rtol=0, atol=0)
    torch.testing.assert_close(unpack(tokens, 6, 4), x, rtol=0, atol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(6, 4, "cpu", torch.float32), ids, rtol=0, atol=0)


def test_schedule_shift_depends_on_resolution_as_in_the_pipeline(folder):
    kwargs = dict(MODEL["flux"][1])
    sigmas = {}
    for size in (16, 32):
        kwargs.update(height=size, width=size)
        model = build_model("flux", path=str(folder), **kwargs)
        sampler = build_sampler("scheduler", model, num_steps=5, eta=0.3)
        pipe = FluxPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        pipe("a red circle", height=size, width=size, num_inference_steps=5, max_sequence_length=16,
             output_type="latent")
        torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas.double(), rtol=0, atol=0)
        torch.testing.assert_close(sampler.model_timesteps(torch.arange(5)), pipe.scheduler.timesteps, rtol=0, atol=0)
        sigmas[size] = sampler.sigmas
    assert (sigmas[32][1:-1] > sigmas[16][1:-1]).all()  # more tokens: a larger mu shifts towards noise


def test_guidance_is_the_embedding_and_no_negative_prompt(folder):
    kwargs = dict(MODEL["flux"][1])
    with pytest.raises(ValueError, match="negative_prompt"):
        build_model("flux", path=str(folder), negative_prompt="blurry", **kwargs)
    model = build_model("flux", path=str(folder), **kwargs)
    x = torch.randn(1, *model.latent_shape())
    cond = model.encode_prompts(["a red circle"])
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = model.predict(x, t, cond)
        model.guidance_scale = 1.0
        b = model.predict(x, t, cond)
    assert not torch.allclose(a, b)
