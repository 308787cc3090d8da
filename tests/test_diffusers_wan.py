"""Wan text-to-video (``wan``) and image-to-video (``wan_i2v``) on tiny random-init Wan 2.1
pipelines of the real classes: pipeline parity (CFG and the first-frame conditioning included),
importance ratio 1 at the first update (with / without LoRA and checkpointing), GRPO steps
through the CLI with LoRA checkpoints that load into the pipeline, full fine-tune export, the
first frame encoded once per prompt, decoded clips for the weight-free rewards, the schedule of
Wan's UniPC scheduler, Wan 2.2 TI2V-5B's per-token timesteps, and one-line user mistakes."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers_fixtures import (
    PROMPTS,
    WAN_MODEL,
    load_wan_pipeline,
    run_wan_pipeline,
    tiny_pipeline,
    wan_images,
    wan_prompt_file,
    wan_train_config,
)

from dancegrpo.cli import main
from dancegrpo.registry import build_model, build_reward
from dancegrpo.samplers import build_sampler
from dancegrpo.trainer import load_config
from dancegrpo.trainer.checkpoint import verify_checkpoint
from dancegrpo.trainer.loop import Trainer
from dancegrpo.trainer.policy import load_trained_policy
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

FAMILIES = ["wan", "wan_i2v"]
STEPS = 4
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory):
    return tiny_pipeline(family, tmp_path_factory)


def _model(family, folder, **overrides):
    name, kwargs = WAN_MODEL[family]
    return build_model(name, path=str(folder), **{**kwargs, **overrides})


def _items(family, prompts, image):
    return [TextPrompt(p, image if family == "wan_i2v" else None) for p in prompts]


def _ode_rollout(model, family, prompts, image=None, seed=0, decode="final"):
    """The adapter's deterministic sampler on the pipeline's schedule through the trainer's
    rollout loop: (initial noise, final latents, decoded clips)."""
    image = wan_images(1)[0] if image is None else image
    sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3)
    r = collect_rollout(model, sampler, _items(family, prompts, image), 1, torch.zeros(STEPS, dtype=torch.bool),
                        torch.Generator().manual_seed(seed), device="cpu", decode=decode)
    return r.latents[:, 0], r.latents[:, -1], r.samples


def _trainer(family, folder, tmp_path, **top):
    cfg = wan_train_config(family, folder, tmp_path / "run", wan_prompt_file(tmp_path, family), **top)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return Trainer(load_config(tmp_path / "cfg.yaml"))


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no_cfg"])
def test_pipeline_parity(family, folder, guidance):
    """eta = 0 and the pipeline's scheduler: our sampler gives the pipeline's latents."""
    model = _model(family, folder, guidance_scale=guidance)
    image = wan_images(1)[0]
    x0, ours, _ = _ode_rollout(model, family, PROMPTS[:2], image)
    pipe = load_wan_pipeline(family, folder)
    ref = run_wan_pipeline(family, pipe, PROMPTS[:2], x0, STEPS, image=image, guidance_scale=guidance)
    assert ours.shape == ref.shape == (2, 16, 2, 4, 4) == (2, *model.latent_shape())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, x0, atol=1e-2)  # the model moved the noise
    if family == "wan_i2v":  # the first frame conditions the result
        other = run_wan_pipeline(family, pipe, PROMPTS[:2], x0, STEPS, image=wan_images(1, seed=1)[0],
                                 guidance_scale=guidance)
        assert (other - ref).abs().max() > 1e-3


def test_decoded_clips_match_the_pipeline_video(family, folder):
    model = _model(family, folder)
    image = wan_images(1)[0]
    x0, _, clips = _ode_rollout(model, family, PROMPTS[:2], image)
    ref = run_wan_pipeline(family, load_wan_pipeline(family, folder), PROMPTS[:2], x0, STEPS, image=image,
                           output_type="pt")  # (B, F, 3, H, W)
    assert clips.shape == (2, 3, 5, 32, 32)
    torch.testing.assert_close(clips, ref.permute(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_ratio_is_one_at_the_first_update(family, folder, tmp_path, lora, checkpointing):
    trainer = _trainer(family, folder, tmp_path, **{"lora.enabled": lora, "model.kwargs.checkpointing": checkpointing})
    assert trainer.model.checkpointed_units() == ([] if checkpointing == "none" else [0, 1])
    (metrics,) = trainer.train()
    assert metrics["optimizer_steps"] >= 1 and metrics["grad_norm"] > 0
    assert abs(metrics["ratio_first_update"] - 1) < 1e-6, metrics["ratio_first_update"]


def test_cli_lora_run_and_checkpoints_load_into_the_pipeline(family, folder, tmp_path):
    cfg = wan_train_config(family, "UNSET", tmp_path / "run", wan_prompt_file(tmp_path, family))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), f"model.kwargs.path={folder}", "max_steps=2",
                 "checkpoint_every=1", "keep_checkpoints=0", "lora.enabled=true"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    image = wan_images(1)[0]
    base_pipe = load_wan_pipeline(family, folder)
    for step in (1, 2):
        ckpt = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        assert "lora/pytorch_lora_weights.safetensors" in verify_checkpoint(ckpt)["files"]
        model, _ = load_trained_policy(ckpt, device="cpu")
        x0, ours, _ = _ode_rollout(model, family, PROMPTS[:2], image)
        pipe = load_wan_pipeline(family, folder)
        pipe.load_lora_weights(ckpt / "lora")
        ref = run_wan_pipeline(family, pipe, PROMPTS[:2], x0, STEPS, image=image)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        base = run_wan_pipeline(family, base_pipe, PROMPTS[:2], x0, STEPS, image=image)
        assert (ref - base).abs().max() > 1e-4  # the trained adapters are in the pipeline


def test_full_finetune_checkpoint_loads_with_from_pretrained(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.denoiser.state_dict().items()}
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "transformer/config.json" in verify_checkpoint(ckpt)["files"]
    loaded = type(trainer.model.denoiser).from_pretrained(ckpt / "transformer")
    trained = trainer.model.denoiser.state_dict()
    assert set(loaded.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())


def test_frozen_components_stay_out_of_training(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path, **{"lora.enabled": True})
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    frozen = model._text_encoders() + [model.frozen.vae]
    assert len(frozen) == (3 if family == "wan_i2v" else 2)  # UMT5 (+ CLIP vision) + VAE
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(k.startswith("transformer.") for k in model.state_dict())


def test_prompts_and_first_frames_are_encoded_once_per_group(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path)
    calls = []
    encode = trainer.model.encode_prompts
    trainer.model.encode_prompts = lambda prompts, *a: calls.append((list(prompts), a)) or encode(prompts, *a)
    trainer.train_step()
    ((prompts, args),) = calls
    assert len(prompts) == 2  # P = 2 prompts for P * G = 6 samples
    if family == "wan_i2v":
        (images,) = args
        assert images.shape == (2, 3, 32, 32)
        cond = encode(prompts, images)
        assert cond["condition"].shape == (2, 4 + 16, 2, 4, 4) and cond["image_embeds"].shape == (2, 65, 4)
        assert cond["condition"][:, :4, 0].eq(1).all() and cond["condition"][:, :4, 1:].eq(0).all()
    else:
        assert args == ()


def test_weight_free_rewards_accept_the_clips(family, folder):
    """Decoded clips (B, 3, F, H, W) go to the shapes world's rewards (the motion and alignment
    rewards parse the shapes grammar, so they get its prompts) and DDPO's JPEG reward."""
    from dancegrpo.worlds.shapes.dataset import PromptDataset

    prompts = [it.text for it in PromptDataset(task="t2v").fixed(2)]
    _, _, clips = _ode_rollout(_model(family, folder), family, prompts, decode="x0")
    assert clips.shape == (2, 3, 5, 32, 32) and 0 <= clips.min() and clips.max() <= 1
    for name in ("shapes_motion", "shapes_alignment", "shapes_aesthetic", "jpeg_compressibility"):
        scores = build_reward(name)(clips, prompts)
        assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all(), name


def test_unipc_schedule_follows_the_pipeline(family, folder, tmp_path):
    """The Wan releases ship UniPC with flow sigmas: the sampler takes its sigmas and timesteps."""
    import shutil

    from diffusers import UniPCMultistepScheduler

    copy = tmp_path / "unipc"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "scheduler")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0).save_pretrained(
        copy / "scheduler")
    index = json.loads((copy / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
    (copy / "model_index.json").write_text(json.dumps(index))
    model = _model(family, copy)
    sampler = build_sampler("scheduler", model, num_steps=5, eta=0.3)
    pipe = load_wan_pipeline(family, copy)
    assert type(pipe.scheduler) is UniPCMultistepScheduler
    pipe.scheduler.set_timesteps(5)
    torch.testing.assert_close(sampler.sigmas, pipe.scheduler.sigmas.double(), rtol=0, atol=0)
    torch.testing.assert_close(sampler.model_timesteps(torch.arange(5)), pipe.scheduler.timesteps.float(),
                               rtol=0, atol=0)
    euler = build_sampler("scheduler", _model(family, folder), num_steps=5, eta=0.3)
    assert not torch.allclose(sampler.sigmas, euler.sigmas)  # shift 5, not the fixture's 3


def test_per_token_timesteps_of_wan22_ti2v(tmp_path):
    """Wan 2.2 TI2V-5B's pipeline feeds one timestep per token (expand_timesteps): parity holds."""
    from diffusers import WanPipeline
    from diffusers_fixtures import _wan_parts

    folder = tmp_path / "ti2v"
    WanPipeline(**_wan_parts(16, None), expand_timesteps=True).save_pretrained(folder)
    model = _model("wan", folder)
    assert model.expand_timesteps
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].shape), with_kwargs=True)
    x0, ours, _ = _ode_rollout(model, "wan", PROMPTS[:2])
    assert seen[0] == (4, 2 * 2 * 2)  # 2B with CFG, 8 tokens
    ref = run_wan_pipeline("wan", load_wan_pipeline("wan", folder), PROMPTS[:2], x0, STEPS)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expand_timesteps"):
        _model("wan_i2v", folder)


def test_user_mistakes_are_one_line(family, folder, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"model.kwargs.num_frames must be 4k\+1"):
        _model(family, folder, num_frames=6)
    with pytest.raises(ValueError, match="model.kwargs.height must be a multiple of 16"):
        _model(family, folder, height=24)
    with pytest.raises(FileNotFoundError, match="model.kwargs.path"):
        _model(family, tmp_path / "missing")
    with pytest.raises(ValueError, match="model.kwargs.vae_tiling must be true or false"):
        _model(family, folder, vae_tiling="yes")
    assert _model(family, folder, vae_tiling=True).frozen.vae.use_tiling
    other = "wan" if family == "wan_i2v" else "wan_i2v"
    with pytest.raises(ValueError, match=f"model.name: {family}"):  # the other family's folder
        build_model(other, path=str(folder), **WAN_MODEL[other][1])
    model = _model(family, folder)
    with pytest.raises(ValueError, match="image"):
        model.encode_prompts(PROMPTS[:1], None if family == "wan_i2v" else wan_images(1))
    cfg = wan_train_config(family, folder, tmp_path / "run", wan_prompt_file(tmp_path, family))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml"), "model.kwargs.num_frames=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.kwargs.num_frames" in err[0]


def test_two_expert_wan22_is_refused(tmp_path):
    from diffusers import WanPipeline
    from diffusers_fixtures import _wan_parts

    parts = _wan_parts(16, None)
    folder = tmp_path / "a14b"
    WanPipeline(**parts, transformer_2=_wan_parts(16, None)["transformer"], boundary_ratio=0.875).save_pretrained(
        folder)
    with pytest.raises(ValueError, match="two-expert Wan 2.2"):
        _model("wan", folder)


@pytest.mark.parametrize("name", ["wan_t2v", "wan_i2v"])
def test_shipped_configs_run_on_tiny_weights(name, tmp_path, tmp_path_factory):
    """The shipped configs as they are (precision, LoRA, checkpointing, schedule), sized down."""
    family = "wan" if name == "wan_t2v" else "wan_i2v"
    folder = tiny_pipeline(family, tmp_path_factory)
    path = CONFIGS / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "model.kwargs.path" in first
    sizes = [f"model.kwargs.{k}={v}" for k, v in WAN_MODEL[family][1].items() if k != "guidance_scale"]
    cfg = load_config(path, [f"model.kwargs.path={folder}", *sizes,
                             f"data.kwargs.path={wan_prompt_file(tmp_path, family)}",
                             *(["data.kwargs.image_size=32"] if family == "wan_i2v" else []),
                             "sampler.num_steps=3", "max_steps=1", "rollout.prompts_per_step=1",
                             "rollout.group_size=2", "rollout.batch_size=0", "optim.train_batch_size=2",
                             "optim.gradient_accumulation_steps=1", "device=cpu", f"output_dir={tmp_path / 'run'}", "log.sample_every=0",
                             "log.num_sample_prompts=0", "log.tensorboard=false", "log.progress=false"])
    assert cfg.rewards[0].name == "jpeg_compressibility"
    (metrics,) = Trainer(cfg).train()
    assert metrics["optimizer_steps"] == 1 and metrics["skipped"] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "lora/pytorch_lora_weights.safetensors" in verify_checkpoint(ckpt)["files"]
