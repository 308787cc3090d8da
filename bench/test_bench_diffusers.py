"""A rollout through the diffusers adapters against the pipeline's own loop, same steps.

Per family (tiny random-init pipelines of the real classes, 32x32 px, 2 prompts x 2 samples,
8 steps): ``pipeline`` is ``pipe(prompts, num_images_per_prompt=2, output_type="pt")`` (text
encoding, the denoising loop, VAE decode); ``adapter_ode`` is ``collect_rollout`` with eta = 0
everywhere (the same computation, plus storing the trajectory); ``adapter_sde`` is the training
rollout (noise and a log-prob at every step). Run: ``pytest bench/test_bench_diffusers.py
--benchmark-only``; the group's table compares the three.
"""

import sys
from pathlib import Path

import pytest
import torch

from dancegrpo.registry import build_model
from dancegrpo.samplers import build_sampler
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from diffusers_fixtures import MODEL, PROMPTS, load_pipeline, tiny_pipeline  # noqa: E402

STEPS, GROUP, SIZE = 8, 2, 32


@pytest.fixture(scope="module", params=["flux", "sd3", "sd", "qwen_image"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    return tiny_pipeline(family, tmp_path_factory)


@pytest.mark.parametrize("impl", ["pipeline", "adapter_ode", "adapter_sde"])
def test_rollout_vs_pipeline(benchmark, family, folder, impl):
    torch.manual_seed(0)
    name, kwargs = MODEL[family]
    kwargs = {**kwargs, "height": SIZE, "width": SIZE}
    prompts = PROMPTS[:2]
    benchmark.group = f"rollout-{family}"
    benchmark.extra_info["backend"] = impl
    if impl == "pipeline":
        pipe = load_pipeline(family, folder)
        call = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=kwargs["guidance_scale"],
                    num_images_per_prompt=GROUP, output_type="pt")
        if "max_sequence_length" in kwargs:
            call["max_sequence_length"] = kwargs["max_sequence_length"]
        if family == "qwen_image":  # true CFG: the scale is true_cfg_scale, on with a negative prompt;
            # num_images_per_prompt > 1 fails in QwenImagePipeline (diffusers 0.42): repeat the prompts
            call.update(true_cfg_scale=call.pop("guidance_scale"), negative_prompt=" ", num_images_per_prompt=1)
            prompts = [p for p in prompts for _ in range(GROUP)]

        def run():
            with torch.no_grad():
                return pipe(prompts, generator=torch.Generator().manual_seed(0), **call).images
    else:
        model = build_model(name, path=str(folder), **kwargs)
        sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=1.0 if family == "sd" else 0.3)
        stochastic = impl == "adapter_sde"
        mask = torch.full((STEPS,), stochastic, dtype=torch.bool)
        items = [TextPrompt(p) for p in prompts]

        def run():
            return collect_rollout(model, sampler, items, GROUP, mask, torch.Generator().manual_seed(0),
                                   device="cpu", share_noise=False, decode="final").samples
    out = benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    assert out.shape == (2 * GROUP, 3, SIZE, SIZE)  # 2 prompts x GROUP samples
