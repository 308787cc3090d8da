"""HunyuanVideo (T2V) and SkyReels-V1 (I2V) on tiny random-init pipelines of the real classes.

Per family: pipeline parity of the deterministic sampler (guidance embedding, SkyReels' true CFG
and first-frame conditioning included), importance ratio 1 at the first update (with / without
LoRA and activation checkpointing), GRPO steps through the CLI with LoRA checkpoints that load
into the pipeline and give the trained adapter's output, clips decoded as (B, 3, T, H, W), and
the shipped configs sized down.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers_fixtures import (
    MODEL,
    PROMPTS,
    first_frames_hunyuan,
    i2v_prompt_file_hunyuan,
    load_pipeline_hunyuan,
    prompt_file,
    run_pipeline_hunyuan,
    tiny_pipeline,
    train_config,
)
from test_diffusers_models import _saved_activation_bytes

from dancegrpo.cli import main
from dancegrpo.registry import build_model, build_reward
from dancegrpo.samplers import build_sampler
from dancegrpo.trainer import load_config
from dancegrpo.trainer.checkpoint import verify_checkpoint
from dancegrpo.trainer.loop import Trainer
from dancegrpo.trainer.policy import load_trained_policy
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

FAMILIES = ["hunyuanvideo", "skyreels_i2v"]
STEPS = 4
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    return tiny_pipeline(family, tmp_path_factory)


def _model(family, folder, **overrides):
    name, kwargs = MODEL[family]
    return build_model(name, path=str(folder), **{**kwargs, **overrides})


def _images(family, n):
    return first_frames_hunyuan(n) if family == "skyreels_i2v" else None


def _ode_rollout(model, family, prompts, seed=0):
    """The adapter's deterministic sampler on the pipeline's schedule, through the trainer's
    rollout loop. Returns (initial noise, final latents, decoded clips)."""
    sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3)
    images = _images(family, len(prompts))
    items = [TextPrompt(p, None if images is None else images[i]) for i, p in enumerate(prompts)]
    r = collect_rollout(model, sampler, items, 1, torch.zeros(STEPS, dtype=torch.bool),
                        torch.Generator().manual_seed(seed), device="cpu", decode="final")
    return r.latents[:, 0], r.latents[:, -1], r.samples


def _data(family, tmp_path):
    if family == "skyreels_i2v":
        return {"data.kwargs.path": str(i2v_prompt_file_hunyuan(tmp_path)), "data.kwargs.task": "i2v",
                "data.kwargs.image_size": [16, 16]}
    return {"data.kwargs.path": str(prompt_file(tmp_path))}


def _trainer(family, folder, tmp_path, **top):
    cfg = train_config(family, folder, tmp_path / "run", "UNSET", **_data(family, tmp_path), **top)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return Trainer(load_config(tmp_path / "cfg.yaml"))


def test_pipeline_parity(family, folder):
    """eta = 0 and the pipeline's scheduler: our sampler gives the pipeline's latents."""
    model = _model(family, folder)
    prompts = PROMPTS[:2]
    x0, ours, clips = _ode_rollout(model, family, prompts)
    pipe = load_pipeline_hunyuan(family, folder)
    ref = run_pipeline_hunyuan(family, pipe, prompts, x0, STEPS, images=_images(family, 2))
    assert ours.shape == ref.shape == (2, 4, 3, 2, 2) == (2, *model.latent_shape())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, x0, atol=1e-2)  # the model moved the noise
    assert clips.shape == (2, 3, 9, 16, 16) and clips.min() >= 0 and clips.max() <= 1
    # the weight-free video rewards take these clips
    assert build_reward("jpeg_compressibility")(clips, prompts).shape == (2,)


def test_guidance_and_first_frame_change_the_result(family, folder):
    """Parity would hold trivially if the guidance (or the image) were ignored: it is not."""
    model = _model(family, folder)
    x0, ours, _ = _ode_rollout(model, family, PROMPTS[:2])
    pipe = load_pipeline_hunyuan(family, folder)
    if family == "hunyuanvideo":
        other = run_pipeline_hunyuan(family, pipe, PROMPTS[:2], x0, STEPS, guidance_scale=1.0)
    else:
        other = run_pipeline_hunyuan(family, pipe, PROMPTS[:2], x0, STEPS, images=first_frames_hunyuan(2, seed=1))
        no_cfg = run_pipeline_hunyuan(family, pipe, PROMPTS[:2], x0, STEPS, images=_images(family, 2),
                                      guidance_scale=1.0)
        assert (no_cfg - ours).abs().max() > 1e-4
    assert (other - ours).abs().max() > 1e-4


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_ratio_is_one_at_the_first_update(family, folder, tmp_path, lora, checkpointing):
    trainer = _trainer(family, folder, tmp_path, **{"lora.enabled": lora, "model.kwargs.checkpointing": checkpointing})
    assert trainer.model.checkpointed_units() == ([] if checkpointing == "none" else
                                                  list(range(len(trainer.model._checkpoint_units()))))
    (metrics,) = trainer.train()
    assert metrics["optimizer_steps"] >= 1 and metrics["grad_norm"] > 0
    assert abs(metrics["ratio_first_update"] - 1) < 1e-6, metrics["ratio_first_update"]


def test_cli_lora_run_and_checkpoints_load_into_the_pipeline(family, folder, tmp_path):
    cfg = train_config(family, "UNSET", tmp_path / "run", "UNSET", **_data(family, tmp_path))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), f"model.kwargs.path={folder}", "max_steps=2",
                 "checkpoint_every=1", "keep_checkpoints=0", "lora.enabled=true"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    base_pipe = load_pipeline_hunyuan(family, folder)
    images = _images(family, 2)
    for step in (1, 2):
        ckpt = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        assert "lora/pytorch_lora_weights.safetensors" in verify_checkpoint(ckpt)["files"]
        model, _ = load_trained_policy(ckpt, device="cpu")
        x0, ours, _ = _ode_rollout(model, family, PROMPTS[:2])
        pipe = load_pipeline_hunyuan(family, folder)
        pipe.load_lora_weights(ckpt / "lora")
        ref = run_pipeline_hunyuan(family, pipe, PROMPTS[:2], x0, STEPS, images=images)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        base = run_pipeline_hunyuan(family, base_pipe, PROMPTS[:2], x0, STEPS, images=images)
        assert (ref - base).abs().max() > 1e-4  # the trained adapters are in the pipeline


def test_full_finetune_checkpoint_loads_with_from_pretrained(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.denoiser.state_dict().items()}
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "transformer/config.json" in verify_checkpoint(ckpt)["files"]
    loaded = type(trainer.model.denoiser).from_pretrained(ckpt / "transformer")
    trained = trainer.model.denoiser.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())


def test_first_frame_is_encoded_once_per_prompt(tmp_path, tmp_path_factory):
    trainer = _trainer("skyreels_i2v", tiny_pipeline("skyreels_i2v", tmp_path_factory), tmp_path)
    calls = []
    encode = trainer.model.frozen.vae.encode
    trainer.model.frozen.vae.encode = lambda x, *a, **k: calls.append(tuple(x.shape)) or encode(x, *a, **k)
    trainer.train_step()
    assert calls == [(2, 3, 1, 16, 16)]  # P = 2 prompts for P * G = 6 samples


def test_user_mistakes_are_one_line(family, folder):
    with pytest.raises(ValueError, match=r"model.kwargs.num_frames must be 4k\+1"):
        _model(family, folder, num_frames=8)
    with pytest.raises(ValueError, match="model.kwargs.height must be a multiple of 16"):
        _model(family, folder, height=24)
    model = _model(family, folder)
    if family == "hunyuanvideo":
        with pytest.raises(ValueError, match="model.kwargs.negative_prompt"):
            _model(family, folder, negative_prompt="blurry")
        with pytest.raises(ValueError, match="text-to-video model: it takes no images"):
            model.encode_prompts(PROMPTS[:1], torch.rand(1, 3, 16, 16))
    else:
        with pytest.raises(ValueError, match="first-frame image"):
            model.encode_prompts(PROMPTS[:1])
        with pytest.raises(ValueError, match=r"data.kwargs.image_size: \[16, 16\]"):
            model.encode_prompts(PROMPTS[:1], torch.rand(1, 3, 32, 32))


def test_frozen_parts_stay_out_of_training_and_prompts_are_encoded_once(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path, **{"lora.enabled": True})
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    frozen = model._text_encoders() + [model.frozen.vae]
    own = {id(p) for p in model.parameters()}
    assert not any(p.requires_grad or id(p) in own for m in frozen for p in m.parameters())
    calls = []
    encode = model.encode_prompts
    model.encode_prompts = lambda prompts, *a: calls.append(list(prompts)) or encode(prompts, *a)
    trainer.train_step()
    assert [len(c) for c in calls] == [2]  # P = 2 prompts for P * G = 6 samples


def test_activation_checkpointing_lowers_saved_activations(family, folder):
    model = _model(family, folder)
    model.train()
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    t = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3).model_timesteps(1, 2)
    images = _images(family, 2)
    cond = model.encode_prompts(PROMPTS[:2]) if images is None else model.encode_prompts(PROMPTS[:2], images)
    results = {}
    for mode in ("none", "selective", "full"):
        model.set_checkpointing(mode, every=2)
        model.zero_grad(set_to_none=True)
        nbytes, out = _saved_activation_bytes(model, x, t, cond)
        out.square().mean().backward()
        results[mode] = (nbytes, out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert results["none"][0] > results["selective"][0] > results["full"][0] > 0, \
        {k: v[0] for k, v in results.items()}
    for mode in ("selective", "full"):  # recomputation changes nothing
        torch.testing.assert_close(results[mode][1], results["none"][1], rtol=0, atol=0)
        for a, b in zip(results[mode][2], results["none"][2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_wrong_frame_count_is_one_cli_line(family, folder, tmp_path, capsys):
    cfg = train_config(family, folder, tmp_path / "run", "UNSET", **_data(family, tmp_path))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml"), "model.kwargs.num_frames=12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.kwargs.num_frames must be 4k+1" in err[0], err


SHIPPED = {"hunyuanvideo_t2v": "hunyuanvideo", "skyreels_i2v": "skyreels_i2v"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_run_on_tiny_weights(name, tmp_path, tmp_path_factory):
    """The paper configs as shipped (precision, LoRA, checkpointing, schedule), sized down."""
    family = SHIPPED[name]
    folder = tiny_pipeline(family, tmp_path_factory)
    path = CONFIGS / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "model.kwargs.path" in first
    sizes = [f"model.kwargs.{k}={v}" for k, v in MODEL[family][1].items() if k in ("height", "width", "num_frames")]
    data = [f"{k}={json.dumps(v)}" for k, v in _data(family, tmp_path).items()]
    cfg = load_config(path, [f"model.kwargs.path={folder}", *sizes, *data, "sampler.num_steps=3", "max_steps=1",
                             "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.batch_size=0",
                             "optim.train_batch_size=2", "optim.gradient_accumulation_steps=1", "device=cpu",
                             f"output_dir={tmp_path / 'run'}", "log.sample_every=0", "log.num_sample_prompts=0",
                             "log.tensorboard=false", "log.progress=false", "eval.num_prompts=1"])
    (metrics,) = Trainer(cfg).train()
    assert metrics["optimizer_steps"] == 1 and metrics["skipped"] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "lora/pytorch_lora_weights.safetensors" in verify_checkpoint(ckpt)["files"]
