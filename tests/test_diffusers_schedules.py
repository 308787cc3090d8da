"""Samplers on a given schedule (what ``sampler.kind: scheduler`` builds from a diffusers
scheduler), and checkpoint exports (the ``lora/`` and denoiser folders) sealed like the rest."""

import pytest
import torch
from diffusers import DDIMScheduler

from dancegrpo.samplers import DDIMSampler, FlowSampler, build_sampler
from dancegrpo.trainer import load_config
from dancegrpo.trainer.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint


def test_flow_sampler_takes_given_sigmas_and_timesteps():
    sigmas = torch.tensor([1.0, 0.8, 0.3, 0.0])
    s = FlowSampler(3, eta=0.5, sigmas=sigmas)
    torch.testing.assert_close(s.sigmas, sigmas.double(), rtol=0, atol=0)
    torch.testing.assert_close(s.model_timesteps(torch.arange(3)), torch.tensor([1000.0, 800.0, 300.0]))
    t = torch.tensor([999.0, 777.0, 333.0])
    assert torch.equal(FlowSampler(3, sigmas=sigmas, timesteps=t).model_timesteps(torch.arange(3)), t)
    c = s.ode_coeffs(1)  # the Euler step of the given schedule: y = x + (0.3 - 0.8) v
    assert float(c.a) == 1.0 and float(c.b) == pytest.approx(-0.5)


@pytest.mark.parametrize("sigmas", [[1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.2], [1.0, 0.6, 0.7, 0.0], [1.2, 0.5, 0.2, 0.0]])
def test_flow_sampler_rejects_a_bad_schedule(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        FlowSampler(3, sigmas=torch.tensor(sigmas))


def test_ddim_sampler_on_given_timesteps_matches_diffusers_variance():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
                          set_alpha_to_one=False)
    sched.set_timesteps(5)
    s = DDIMSampler(sched.alphas_cumprod, 5, eta=1.0, timesteps=sched.timesteps,
                    final_alpha_cumprod=float(sched.final_alpha_cumprod))
    assert torch.equal(s.timesteps, sched.timesteps)
    for i, t in enumerate(sched.timesteps.tolist()):
        std = sched._get_variance(t, t - 1000 // 5) ** 0.5
        assert float(s.coeffs(i).std) == pytest.approx(float(std), rel=1e-5)
    with pytest.raises(ValueError, match="decreasing"):
        DDIMSampler(sched.alphas_cumprod, 5, timesteps=sched.timesteps.flip(0))


def test_scheduler_kind_needs_a_model_with_a_scheduler():
    cfg = load_config(None, ["sampler.kind=scheduler"])
    assert cfg.sampler.kind == "scheduler"
    with pytest.raises(ValueError, match="sampler kind 'scheduler' needs a model with its own scheduler"):
        build_sampler("scheduler", object(), num_steps=4, eta=0.3)


def test_checkpoint_exports_are_hashed(tmp_path):
    def export(directory):
        (directory / "lora").mkdir()
        (directory / "lora" / "weights.bin").write_bytes(b"abc")

    manager = CheckpointManager(tmp_path)
    model = torch.nn.Linear(2, 1)
    path = manager.save(1, model=model, optimizer=torch.optim.AdamW(model.parameters()), rng_state={}, run_state={},
                        config_yaml="", export=export)
    assert "lora/weights.bin" in verify_checkpoint(path)["files"]
    (path / "lora" / "weights.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="lora/weights.bin"):
        verify_checkpoint(path)
