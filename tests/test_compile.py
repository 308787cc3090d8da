"""The GRPO ops under ``torch.compile``: real models, strided tensors, fresh processes, no syncs.

* Compiled training (inductor, fullgraph) of a model whose output is a permuted view, on latents
  that are slices of a rollout buffer, equals eager on every backend, fp32 and bf16 autocast.
* The raw ops accept any strides, and their fake kernels report the real output strides.
* In a fresh process every public op compiles with fullgraph without an eager call first.
* group_advantages' value check and sample_step's generator under fullgraph.
* Building coefficients never reads a device value back (no host sync).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

import dancegrpo as dg
from dancegrpo.models import DiTConfig, VideoDiT
from dancegrpo.ops import get_backend

BACKENDS = ("torch", "native", "triton", "auto")  # triton: interpreted on CPU (conftest.py)
B, T, H, W, C = 2, 3, 8, 8, 4


def _coeffs():
    return dg.flow_sde_coeffs(torch.tensor([0.9, 0.7]), torch.tensor([0.8, 0.55]), 0.6)


# ---- compiled training of real models ------------------------------------------------------------

def _video_dit():
    return VideoDiT(DiTConfig(in_channels=C, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2,
                              text_dim=16))


def _sd3():
    return SD3Transformer2DModel(sample_size=H, patch_size=2, in_channels=C, out_channels=C, num_layers=1,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                 caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=H)


def _channels_last_velocity(name, model, device):
    """The model as a trainer on (B, H, W, C) latents sees it: its output is a permuted view."""
    text = torch.randn(B, 3, 16, device=device)
    pooled = torch.randn(B, 8, device=device)
    timestep = torch.tensor([900.0, 700.0], device=device)

    def velocity(x):  # x: (B, H, W, C); the model runs on the (B, C, H, W) view of it
        nchw = x.permute(0, 3, 1, 2)
        if name == "video_dit":
            out = model(nchw, timestep, text)
        else:
            out = model(hidden_states=nchw, encoder_hidden_states=text, pooled_projections=pooled,
                        timestep=timestep, return_dict=False)[0]
        return out.permute(0, 2, 3, 1)

    return velocity


def _compiled_training_equals_eager(name, amp, device, backends):
    """One inductor graph holds the model forward and grpo_step_loss on each backend; each loss
    and its parameter gradients equal eager. The latents are time slices of a (B, T, H, W, C)
    rollout buffer (strided views) and the model output is a permuted view, so the ops see
    strided tensors in the forward and whatever layout inductor chose for the saved ones in
    the backward."""
    model = (_video_dit() if name == "video_dit" else _sd3()).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    velocity = _channels_last_velocity(name, model, device)
    coeffs = _coeffs().to(device)
    traj = torch.randn(B, T, H, W, C, device=device)
    adv = torch.tensor([1.3, -0.8], device=device)
    with torch.no_grad():
        v0 = velocity(traj[:, 0]).float()
    old = dg.step_logprob(v0, traj[:, 0], traj[:, 1], coeffs, backend="torch") + 1e-4 * torch.randn(B, device=device)

    def losses(traj):
        x, y = traj[:, 0], traj[:, 1]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            v = velocity(x)
        return torch.stack([dg.grpo_step_loss(v, x, y, coeffs, old, adv, clip_range=0.2, backend=b)[0]
                            for b in backends])

    compiled = torch.compile(losses, fullgraph=True, backend="inductor")
    got, want = compiled(traj), losses(traj)
    # Errors relative to the largest value (the loss; all parameter gradients together). fp32:
    # the compiled model fuses and reorders sums (seen on CPU: < 3e-5). bf16 autocast: it rounds
    # to bf16 at other points than eager does (seen on CPU: < 7e-3, about 2 bf16 ulps). A layout
    # mistake scrambles elements: errors of order 1.
    tol = 2e-2 if amp else 1e-4

    def flat_grad(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([torch.zeros(p.numel(), device=device) if g is None else g.flatten().float()
                          for p, g in zip(params, grads, strict=True)])

    for i, backend in enumerate(backends):
        for what, a, e in [("loss", got[i], want[i]), ("gradient", flat_grad(got[i]), flat_grad(want[i]))]:
            err = ((a - e).abs().max() / e.abs().max()).item()
            assert err <= tol, f"{backend} {what}: compiled differs from eager by {err:.3g} of its largest value"


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["video_dit", "sd3"])
def test_compiled_training_of_a_real_model_equals_eager(name, amp, seed):
    # Triton takes CPU tensors only in its interpreter (set by conftest.py without a GPU).
    backends = BACKENDS if get_backend("triton").interpreted else ("torch", "native", "auto")
    _compiled_training_equals_eager(name, amp, "cpu", backends)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", ["video_dit", "sd3"])
def test_gpu_compiled_training_of_a_real_model_equals_eager(name, amp, seed):
    _compiled_training_equals_eager(name, amp, "cuda", ("torch", "triton", "auto"))


# ---- raw ops: any strides, fake strides == real strides ------------------------------------------

def _op_cases(ns, dev):
    """Each raw op of namespace ``ns`` with strided inputs on device ``dev``."""
    ops = getattr(torch.ops, ns)
    shape = (B, 3, 5, 7)
    rand = lambda *size: torch.randn(*size, device=dev)

    def every_other(t):  # the same values in a stride-2 view
        return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]

    def permuted(dtype=torch.float32):  # strides reversed after the batch dimension
        return rand(shape[0], *shape[:0:-1]).permute(0, 3, 2, 1).to(dtype)

    c = _coeffs().to(dev)
    a, b, std = c.a, c.b, c.std
    v = rand(B, 2, *shape[1:]).to(torch.bfloat16)[:, 1].requires_grad_()  # a slice (a leaf)
    x = permuted()
    col = (-1, 1, 1, 1)
    y = a.view(col) * x + b.view(col) * v.detach().float() + std.view(col) * rand(*shape)
    y = y.transpose(1, 3).contiguous().transpose(1, 3)  # channels-last-like layout
    v_ref = permuted(torch.bfloat16)
    g = every_other(rand(B))
    logp = every_other(rand(B) - 3).requires_grad_()
    old = every_other(logp.detach() + 1e-3 * rand(B))
    advs = every_other(rand(B))
    return {
        "logprob_fwd": (ops.logprob_fwd.default, (v, x, y, v_ref, every_other(a), b, std, False)),
        "logprob_bwd": (ops.logprob_bwd.default, (g, g, v.detach(), x, y, v_ref, every_other(a), b, std, False,
                                                  True, True, True)),
        "sample_step": (ops.sample_step.default, (v.detach(), x, y, a, b, std, False)),
        "group_advantages": (ops.group_advantages.default, (rand(3, 8).t(), torch.ones(3, device=dev), 4, 0, True,
                                                            1e-8, 5.0, False, False)),
        "policy_loss_fwd": (ops.policy_loss_fwd.default, (logp, old, advs, old, 0.2, 0.2, 0.1, 2)),
        "policy_loss_bwd": (ops.policy_loss_bwd.default, (g, logp.detach(), old, advs, old, 0.2, 0.2, 0.1, 2)),
    }


@pytest.mark.parametrize("ns", ["dancegrpo", "dancegrpo_triton"], ids=["native", "triton"])
@pytest.mark.parametrize("case", ["logprob_fwd", "logprob_bwd", "sample_step", "group_advantages",
                                  "policy_loss_fwd", "policy_loss_bwd"])
def test_ops_accept_strided_inputs(ns, case, seed):
    """opcheck on strided inputs (it compares the fake kernel's output strides with the real
    ones), and the results equal those of the same values laid out contiguously."""
    backend = get_backend("native" if ns == "dancegrpo" else "triton")
    assert not backend.unavailable_reasons()  # both are built by the dev install
    dev = "cpu" if ns == "dancegrpo" or backend.interpreted else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a CUDA device")
    op, args = _op_cases(ns, dev)[case]
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result
    got = op(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
    want = op(*(t.detach().contiguous() if isinstance(t, torch.Tensor) else t for t in args))
    for a, e in zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]:
        assert a.is_contiguous()
        assert torch.equal(a, e)


# ---- every public op traces from a fresh process -------------------------------------------------

_FRESH = textwrap.dedent("""
    import sys, torch, dancegrpo as dg
    backend = sys.argv[1]
    c = dg.flow_sde_coeffs(torch.tensor([0.9, 0.7]), torch.tensor([0.8, 0.55]), 0.6)

    def step(v, x, noise, rewards, old):
        y, logp_roll = dg.sample_step(v, x, c, noise=noise, backend=backend)
        y2, _ = dg.sample_step(v, x, c, backend=backend)  # noise from the global RNG
        logp = dg.step_logprob(v, x, y, c, backend=backend)
        adv = dg.group_advantages(rewards, 2, backend=backend)
        loss1, _ = dg.clipped_ratio_loss(logp, old, adv, clip_range=0.2, backend=backend)
        loss2, stats = dg.grpo_step_loss(v, x, y, c, old, adv, clip_range=0.2, ref_model_output=v.detach() * 0.9,
                                         beta=0.1, backend=backend)
        return y, logp_roll, y2.shape, logp, adv, loss1, loss2, stats["kl"]

    v = torch.randn(2, 3, 4, 5).requires_grad_()
    x, noise = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    rewards, old = torch.tensor([0.2, 0.9]), torch.randn(2) - 2
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(v, x, noise, rewards, old)
    (g_got,) = torch.autograd.grad(got[-2], v)
    want = step(v, x, noise, rewards, old)
    (g_want,) = torch.autograd.grad(want[-2], v)
    assert got[2] == want[2]
    for a, e in zip(got[:2] + got[3:] + (g_got,), want[:2] + want[3:] + (g_want,)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    print("fresh compile ok", backend)
""")


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
def test_every_op_compiles_fullgraph_in_a_fresh_process(backend):
    """Nothing runs eagerly before ``torch.compile(fullgraph=True)``: the first dispatch, which
    loads the backend (extension import, op registration), happens inside the trace."""
    env = dict(os.environ, DANCEGRPO_BACKEND="")
    done = subprocess.run([sys.executable, "-c", _FRESH, backend], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"fresh compile ok {backend}" in done.stdout


# ---- value checks and generators under fullgraph --------------------------------------------------

def test_group_advantages_raise_policy_traces():
    """nan_policy="raise" (the default) stays in the graph: finite rewards pass, a NaN raises
    from the compiled code with the message (CPU: a RuntimeError from the in-graph assert)."""
    f = torch.compile(lambda r: dg.group_advantages(r, 2, backend="torch"), fullgraph=True, backend="aot_eager")
    r = torch.tensor([0.1, 0.5, 0.3, 0.2])
    torch.testing.assert_close(f(r), dg.group_advantages(r, 2, backend="torch"))
    with pytest.raises(RuntimeError, match="rewards has non-finite values; pass nan_policy='drop'"):
        f(torch.tensor([0.1, float("nan"), 0.3, 0.2]))
    with pytest.raises(ValueError, match=r"non-finite values.*\(samples \[1\]\)"):  # eager: names the samples
        dg.group_advantages(torch.tensor([0.1, float("nan"), 0.3, 0.2]), 2)


def test_sample_step_generator_under_compile():
    """A torch.Generator cannot enter a graph: fullgraph says so in one line; without fullgraph
    the step runs eagerly after a graph break and draws exactly what eager draws."""
    c = _coeffs()
    v, x = torch.randn(B, 6), torch.randn(B, 6)

    def step(v, x, g):
        return dg.sample_step(v, x, c, generator=g, backend="native")

    full = torch.compile(step, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="generator= does not trace under torch.compile"):
        full(v, x, torch.Generator().manual_seed(1))
    got = torch.compile(step, backend="eager")(v, x, torch.Generator().manual_seed(1))
    want = step(v, x, torch.Generator().manual_seed(1))
    for a, e in zip(got, want, strict=True):
        assert torch.equal(a, e)


def test_coefficient_checks_run_inside_the_graph():
    """Built inside a compiled function, invalid coefficients still raise (an in-graph assert)."""
    f = torch.compile(lambda s: dg.flow_sde_coeffs(s, s - 0.1, 0.5).std, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(torch.tensor([0.9, 0.5])), dg.flow_sde_coeffs(torch.tensor([0.9, 0.5]),
                                                                              torch.tensor([0.8, 0.4]), 0.5).std)
    with pytest.raises(RuntimeError, match=r"sigma must lie in \(0, 1\]"):
        f(torch.tensor([1.5, 0.5]))
    x = torch.randn(2, 6)
    logp = torch.compile(lambda x, eta: dg.step_logprob(x, x, x, dg.flow_sde_coeffs(0.9, 0.8, eta), backend="native"),
                         fullgraph=True, backend="aot_eager", dynamic=False)
    logp(x, torch.tensor(0.3))
    with pytest.raises(RuntimeError, match=r"step_logprob: coeffs.std must be > 0 for a log-probability"):
        logp(x, torch.tensor(0.0))  # an ODE step has no log-prob


# ---- no host syncs when building coefficients ----------------------------------------------------

class _CountSyncs(TorchDispatchMode):
    """Counts reads of a device value back to the host (``.item()``, ``bool()``, ``.tolist()``
    all go through ``aten._local_scalar_dense``) on non-CPU tensors, answering True so that the
    code under test runs on; "meta" tensors stand in for a GPU's."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.syncs += 1
            return True
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("build", [
    pytest.param(lambda s, sn: dg.flow_sde_coeffs(s, sn, 0.7), id="dance"),
    pytest.param(lambda s, sn: dg.flow_sde_coeffs(s, sn, 0.7, variant="flow_grpo", sigma_max=0.96), id="flow_grpo"),
    pytest.param(lambda s, sn: dg.flow_sde_coeffs(s, sn, torch.full_like(s, 0.7), variant="cps"), id="cps"),
    pytest.param(lambda s, sn: dg.ddim_coeffs(1 - s, 1 - sn, 1.0), id="ddim"),
    pytest.param(lambda s, sn: dg.StepCoeffs(s, sn, s)[torch.tensor([0, 2], device=s.device)], id="StepCoeffs"),
])
def test_coefficients_on_a_device_never_sync(build):
    s = torch.full((4,), 0.9, device="meta")
    sn = torch.full((4,), 0.8, device="meta")
    with _CountSyncs() as mode:
        coeffs = build(s, sn)
        coeffs.check_positive_std("step_logprob")
        a, b, std = coeffs.expand(coeffs.batch, s.device)
    assert mode.syncs == 0
    assert a.device.type == b.device.type == std.device.type == "meta"


@pytest.mark.gpu
def test_gpu_coefficients_never_sync():
    """The same on a real GPU, where CUDA itself reports any synchronising call."""
    s = torch.tensor([0.9, 0.7], device="cuda")
    sn = torch.tensor([0.8, 0.55], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for coeffs in (dg.flow_sde_coeffs(s, sn, 0.7), dg.flow_sde_coeffs(s, sn, s * 0.5, variant="cps"),
                       dg.flow_sde_coeffs(s, sn, 0.7, variant="flow_grpo", sigma_max=0.96),
                       dg.ddim_coeffs(1 - s, 1 - sn, 1.0)):
            coeffs.check_positive_std("step_logprob")
            coeffs.expand(2, s.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # and no device-side assert fired
