"""Public API contract: bad input names the argument; dispatch rules; `import dancegrpo` stays light."""

import os
import re
import subprocess
import sys

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import dispatch


def _inputs(B=3, N=10, dtype=torch.float32):
    v, x, y = (torch.randn(B, N, dtype=dtype) for _ in range(3))
    c = dg.StepCoeffs(torch.ones(B), torch.ones(B), torch.full((B,), 0.5))
    return v, x, y, c


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda v, x, y, c: (v, x[:, :5], y, c), ValueError, "latents has shape"),
        (lambda v, x, y, c: (v, x, y.long(), c), TypeError, "next_latents must be a float"),
        (lambda v, x, y, c: (v, x, y.to("meta"), c), ValueError, "next_latents is on meta"),
        (lambda v, x, y, c: (v, x, y, (1, 2, 3)), TypeError, "coeffs must be a StepCoeffs"),
        (lambda v, x, y, c: (v[:0], x[:0], y[:0], c), ValueError, "empty batch"),
        (lambda v, x, y, c: (v, x, y, dg.StepCoeffs(torch.ones(2), torch.ones(2), torch.ones(2))), ValueError,
         "B=3"),
        (lambda v, x, y, c: (v, x, y, dg.StepCoeffs(torch.ones(3), torch.ones(3), torch.zeros(3))), ValueError,
         "std must be > 0"),
        (lambda v, x, y, c: (v.sum(), x, y, c), ValueError, "model_output must have a batch dimension"),
    ],
)
def test_step_logprob_bad_input(mutate, exc, match):
    args = mutate(*_inputs())
    with pytest.raises(exc, match=match):
        dg.step_logprob(*args)


def test_other_ops_bad_input():
    v, x, y, c = _inputs()
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match="group_size=4 does not divide the batch B=6"):
        dg.group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="std must be one of"):
        dg.group_advantages(torch.randn(6), 3, std="batch")
    with pytest.raises(ValueError, match="weights has 1 values but rewards has K=2"):
        dg.group_advantages(torch.randn(6, 2), 3, weights=[1.0])
    with pytest.raises(ValueError, match="rewards is empty"):
        dg.group_advantages(torch.zeros(0), 1)
    with pytest.raises(ValueError, match="old_logp must have shape \\(3,\\)"):
        dg.clipped_ratio_loss(lp, torch.zeros(4), lp)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        dg.clipped_ratio_loss(lp, lp, lp, beta=0.1)
    with pytest.raises(ValueError, match="clip_range must be >= 0"):
        dg.clipped_ratio_loss(lp, lp, lp, clip_range=-0.1)
    with pytest.raises(ValueError, match="beta > 0 needs ref_model_output"):
        dg.grpo_step_loss(v, x, y, c, lp, lp, beta=0.1)
    with pytest.raises(ValueError, match="ref_model_output has shape"):
        dg.grpo_step_loss(v, x, y, c, lp, lp, ref_model_output=v[:, :2], beta=0.1)
    with pytest.raises(ValueError, match="noise has shape"):
        dg.sample_step(v, x, c, noise=torch.randn(3, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        dg.step_logprob(v, x, y, c, backend="cuda-magic")


def test_noncontiguous_inputs_work():
    v, x, y, c = _inputs(N=12)
    vt = v.view(3, 3, 4).transpose(1, 2)
    xt, yt = x.view(3, 3, 4).transpose(1, 2), y.view(3, 3, 4).transpose(1, 2)
    assert not vt.is_contiguous()
    out = dg.step_logprob(vt, xt, yt, c)
    ref = dg.step_logprob(vt.contiguous(), xt.contiguous(), yt.contiguous(), c, backend="torch")
    torch.testing.assert_close(out, ref)


class _Fake(dispatch.Backend):
    name = "fake"
    devices = ("cpu",)

    def __init__(self, reasons):
        self._reasons = reasons

    def unavailable_reasons(self):
        return list(self._reasons)


def test_dispatch_rules(monkeypatch):
    monkeypatch.setitem(dispatch._BACKEND_PATHS, "fake", "x:y")
    monkeypatch.setitem(dispatch._loaded, "fake", _Fake(["kernel missing"]))
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", ("fake", "torch"))
    t = torch.zeros(2)
    assert dispatch.select_backend("step_logprob", "auto", (t,)).name == "torch"  # auto skips the unusable one
    with pytest.raises(RuntimeError, match="backend 'fake' cannot run step_logprob: kernel missing"):
        dispatch.select_backend("step_logprob", "fake", (t,))
    monkeypatch.setenv("DANCEGRPO_BACKEND", "fake")  # the override is an explicit choice: it raises
    with pytest.raises(RuntimeError, match="kernel missing"):
        dispatch.select_backend("step_logprob", "auto", (t,))
    monkeypatch.delenv("DANCEGRPO_BACKEND")
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", ("fake",))
    with pytest.raises(RuntimeError, match="(?s)no backend can run step_logprob.*fake: kernel missing"):
        dispatch.select_backend("step_logprob", "auto", (t,))
    # fp64 inputs: only the reference supports them
    monkeypatch.setitem(dispatch.PRIORITY, "cpu", ("native", "torch"))
    assert dispatch.select_backend("step_logprob", "auto", (t.double(),)).name == "torch"


def test_import_is_light():
    code = (
        "import sys, dancegrpo, torch\n"
        "bad = [m for m in ('triton', 'dancegrpo._C', 'dancegrpo.kernels', 'dancegrpo.trainer', 'transformers',"
        " 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DANCEGRPO_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_env_report_shows_the_expected_backends_available():
    # native is built by `make setup`; triton runs interpreted on CPU (TRITON_INTERPRET, conftest.py)
    out = subprocess.run([sys.executable, "-m", "dancegrpo.env"], check=True, capture_output=True, text=True).stdout
    for name in ("torch", "native", "triton"):
        assert re.search(rf"^  {name} +available\b", out, re.M), out
