"""The diffusers adapters (flux, sd3, sd, qwen_image) on tiny random-init pipelines of the real classes.

Every family: pipeline parity of the deterministic sampler (CFG included), importance ratio 1
at the first update (with / without LoRA and activation checkpointing), GRPO steps through the
CLI, LoRA checkpoints that load into the pipeline and give the trained adapter's output, full
fine-tune checkpoints that load with ``from_pretrained``, frozen parts kept out of training,
and activation checkpointing that lowers the saved activations.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers_fixtures import (
    MODEL,
    PROMPTS,
    load_pipeline,
    prompt_file,
    run_pipeline,
    tiny_pipeline,
    train_config,
)

from dancegrpo.cli import main
from dancegrpo.registry import build_model
from dancegrpo.samplers import build_sampler
from dancegrpo.trainer import load_config
from dancegrpo.trainer.checkpoint import verify_checkpoint
from dancegrpo.trainer.loop import Trainer
from dancegrpo.trainer.policy import load_trained_policy
from dancegrpo.trainer.prompts import TextPrompt
from dancegrpo.trainer.rollout import collect_rollout

FAMILIES = ["flux", "sd3", "sd", "qwen_image"]
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


def _ode_rollout(model, prompts, seed=0):
    """The adapter's deterministic sampler (eta = 0 everywhere) on the family's own schedule,
    through the trainer's rollout loop. Returns (initial noise, final latents)."""
    sampler = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3)
    mask = torch.zeros(STEPS, dtype=torch.bool)
    r = collect_rollout(model, sampler, [TextPrompt(p) for p in prompts], 1, mask, torch.Generator().manual_seed(seed),
                        device="cpu", decode="final")
    return r.latents[:, 0], r.latents[:, -1]


def _trainer(family, folder, tmp_path, **top):
    cfg = train_config(family, folder, tmp_path / "run", prompt_file(tmp_path), **top)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return Trainer(load_config(tmp_path / "cfg.yaml"))


def test_pipeline_parity(family, folder):
    """eta = 0 and the pipeline's scheduler: our sampler gives the pipeline's latents."""
    model = _model(family, folder)
    prompts = PROMPTS[:2]
    x0, ours = _ode_rollout(model, prompts)
    ref = run_pipeline(family, load_pipeline(family, folder), prompts, x0, STEPS)
    assert ours.shape == ref.shape == (2, *model.latent_shape())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, x0, atol=1e-2)  # the model moved the noise


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
    cfg = train_config(family, "UNSET", tmp_path / "run", prompt_file(tmp_path))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "cfg.yaml"), f"model.kwargs.path={folder}", "max_steps=2",
                 "checkpoint_every=1", "keep_checkpoints=0", "lora.enabled=true"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    base_pipe = load_pipeline(family, folder)
    for step in (1, 2):
        ckpt = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        assert "lora/pytorch_lora_weights.safetensors" in verify_checkpoint(ckpt)["files"]
        model, _ = load_trained_policy(ckpt, device="cpu")
        x0, ours = _ode_rollout(model, PROMPTS[:2])
        pipe = load_pipeline(family, folder)
        pipe.load_lora_weights(ckpt / "lora")
        ref = run_pipeline(family, pipe, PROMPTS[:2], x0, STEPS)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        base = run_pipeline(family, base_pipe, PROMPTS[:2], x0, STEPS)
        assert (ref - base).abs().max() > 1e-4  # the trained adapters are in the pipeline


def test_full_finetune_checkpoint_loads_with_from_pretrained(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path)
    before = {k: v.clone() for k, v in trainer.model.denoiser.state_dict().items()}
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    name = trainer.model.denoiser_name
    assert f"{name}/config.json" in verify_checkpoint(ckpt)["files"]
    loaded = type(trainer.model.denoiser).from_pretrained(ckpt / name)
    trained = trainer.model.denoiser.state_dict()
    assert set(loaded.state_dict()) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in trained.items())


def test_frozen_components_stay_out_of_training(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path, **{"lora.enabled": True})
    model = trainer.model
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(model.denoiser_name + ".") and "lora_" in n for n in names)
    assert sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = model._text_encoders() + [model.frozen.vae]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    own = {id(p) for p in model.parameters()}
    assert not any(id(p) in own for m in frozen for p in m.parameters())
    assert all(k.startswith(model.denoiser_name + ".") for k in model.state_dict())


def test_prompts_are_encoded_once_per_group(family, folder, tmp_path):
    trainer = _trainer(family, folder, tmp_path)
    calls = []
    encode = trainer.model.encode_prompts
    trainer.model.encode_prompts = lambda prompts, *a: calls.append(list(prompts)) or encode(prompts, *a)
    trainer.train_step()
    assert [len(c) for c in calls] == [2]  # P = 2 prompts for P * G = 6 samples


def _saved_activation_bytes(model, x, t, cond):
    """Bytes of the non-parameter tensors autograd saves for backward in one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model.predict(x, t, cond)
    return sum(seen.values()), out


def test_activation_checkpointing_lowers_saved_activations(family, folder):
    model = _model(family, folder)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape(), generator=g)
    t = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3).model_timesteps(1, 2)
    cond = model.encode_prompts(PROMPTS[:2])
    results = {}
    for mode in ("none", "selective", "full"):
        model.set_checkpointing(mode, every=2)
        model.zero_grad(set_to_none=True)
        nbytes, out = _saved_activation_bytes(model, x, t, cond)
        out.square().mean().backward()
        # None: a parameter outside the output's graph (Qwen-Image's last block drops its text stream)
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        results[mode] = (nbytes, out.detach(), grads)
    assert results["none"][0] > results["selective"][0] > results["full"][0] > 0, \
        {k: v[0] for k, v in results.items()}
    for mode in ("selective", "full"):  # recomputation changes nothing
        torch.testing.assert_close(results[mode][1], results["none"][1], rtol=0, atol=0)
        for a, b in zip(results[mode][2], results["none"][2], strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():  # eval / no-grad forwards are never recomputed
        assert torch.equal(model.predict(x, t, cond), results["none"][1])


def test_user_mistakes_are_one_line(family, folder, tmp_path, capsys):
    name, kwargs = MODEL[family]
    with pytest.raises(FileNotFoundError, match="model.kwargs.path"):
        build_model(name, path=str(tmp_path / "missing"), **kwargs)
    with pytest.raises(ValueError, match="model.kwargs.height must be a multiple of"):
        _model(family, folder, height=17)
    with pytest.raises(ValueError, match="model.kwargs.dtype"):
        _model(family, folder, dtype="float8")
    cfg = train_config(family, tmp_path / "missing", tmp_path / "run", prompt_file(tmp_path))
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.kwargs.path" in err[0]


def test_scheduler_kind_is_explicit(family, folder):
    """kind=scheduler follows the pipeline; kind=flow/ddim is the DanceGRPO schedule."""
    model = _model(family, folder)
    own = build_sampler("scheduler", model, num_steps=STEPS, eta=0.3)
    dance = build_sampler("auto", model, num_steps=STEPS, eta=0.3, shift=3.0)
    assert type(own) is type(dance)
    if hasattr(own, "sigmas"):
        assert not torch.allclose(own.sigmas, dance.sigmas)


def test_import_dancegrpo_loads_no_diffusers():
    code = ("import sys, dancegrpo, dancegrpo.models.diffusers, dancegrpo.registry; "
            "print([m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"



SHIPPED = {"flux_lora": "flux", "flux_lora_fsdp": "flux", "sd35_flowgrpo": "sd3", "sd14_dancegrpo": "sd"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_run_on_tiny_weights(name, tmp_path, tmp_path_factory):
    """The paper configs as shipped (precision, LoRA, KL, checkpointing, schedule), sized down."""
    family = SHIPPED[name]
    folder = tiny_pipeline(family, tmp_path_factory)
    path = CONFIGS / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "model.kwargs.path" in first
    sizes = [f"model.kwargs.{k}={v}" for k, v in MODEL[family][1].items() if k != "guidance_scale"]
    cfg = load_config(path, [f"model.kwargs.path={folder}", *sizes, f"data.kwargs.path={prompt_file(tmp_path)}",
                             "rewards=[{name: jpeg_compressibility}]", "sampler.num_steps=3", "max_steps=1",
                             "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.batch_size=0",
                             "optim.train_batch_size=2", "optim.gradient_accumulation_steps=1", "device=cpu",
                             f"output_dir={tmp_path / 'run'}", "log.sample_every=0", "log.num_sample_prompts=0",
                             "log.tensorboard=false", "log.progress=false"])
    (metrics,) = Trainer(cfg).train()
    assert metrics["optimizer_steps"] == 1 and metrics["skipped"] == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    export = "lora/pytorch_lora_weights.safetensors" if cfg.lora.enabled else \
        f"{'unet' if family == 'sd' else 'transformer'}/config.json"
    assert export in verify_checkpoint(ckpt)["files"]
