"""Ulysses sequence parallelism over 2 gloo ranks equals the single-process computation:
attention alone, and the whole VideoDiT forward and backward (cross and joint attention,
RoPE, first-frame conditioning, activation checkpointing, token counts not divisible by 2).

Each rank computes the single-process reference itself (same seed, same inputs) and returns
the largest differences; fp64 so that only reduction order separates the two paths.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dancegrpo.models.attention import attention
from dancegrpo.models.config import DiTConfig
from dancegrpo.models.dit import VideoDiT
from tests.distributed_utils import run_ranks

TOL = 1e-10
# Gradients of norm weights and inputs are reduced over tokens inside the fp32 norms
# (LayerNorm32, RMSNorm compute in fp32 by design): splitting the tokens changes that fp32
# sum's order, a few fp32 ulps (measured 1.2e-7). A wrong split or reduction is off by O(1).
GRAD_TOL = 1e-6


def _max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- attention
def _attention_rank(rank, world, n_tokens):
    from dancegrpo.distributed.sequence_parallel import SequenceParallel

    g = torch.Generator().manual_seed(0)
    b, h, d = 2, 4, 8
    q, k, v, w = (torch.randn(b, n_tokens, h, d, generator=g, dtype=torch.float64) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = attention(q, k, v, backend="sdpa")
    (ref * w).sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    shard = SequenceParallel().shard(n_tokens)
    ql, kl, vl = (shard.to_heads(shard.split(t)) for t in (q, k, v))
    assert ql.shape == (b, shard.padded, h // world, d)
    out = shard.to_tokens(attention(ql, kl, vl, shard.key_mask(b, q.device), backend="sdpa"))
    full = shard.gather(out)
    (full * w).sum().backward()
    # Input gradients are partial per rank (each rank's tokens): sum them over the group.
    grads = [t.grad.clone() for t in (q, k, v)]
    for gr in grads:
        torch.distributed.all_reduce(gr)
    valid = min(shard.local, n_tokens - shard.start)  # rank 1's last row is padding when n is odd
    return (_max_diff(full, ref), _max_diff(out[:, :valid], ref[:, shard.start:shard.start + valid]),
            max(_max_diff(a, r) for a, r in zip(grads, ref_grads, strict=True)))


@pytest.mark.parametrize("n_tokens", [8, 7])
def test_sequence_parallel_attention_equals_single_process(n_tokens):
    for out_err, local_err, grad_err in run_ranks(_attention_rank, 2, n_tokens):
        assert out_err < TOL and local_err < TOL and grad_err < TOL


# ----------------------------------------------------------------------------- the DiT
CASES = {
    # cross-attention to padded text, RoPE, first-frame conditioning, every block checkpointed,
    # 3 x 3 x 3 = 27 tokens (odd: one padding token on rank 1)
    "cross_i2v_ckpt_odd": (dict(in_channels=3, patch_size=(1, 2, 2), hidden_size=48, depth=2, num_heads=4,
                                text_dim=16, image_condition=True, checkpointing="full", absolute_pos=True,
                                frame_embedding=4),
                           (3, 6, 6)),
    # MM-DiT joint attention (text stream gathered over heads), shared modulation, 2 x 3 x 2 = 12 tokens
    "joint_even": (dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=48, depth=3, num_heads=4,
                        text_dim=16, joint_attention=True, modulation="shared"),
                   (2, 6, 4)),
    # joint attention, 5 frames x 1 x 3 = 15 tokens (odd), selective checkpointing
    "joint_odd_ckpt": (dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=48, depth=2, num_heads=2,
                            text_dim=16, joint_attention=True, checkpointing="selective", checkpoint_every=1),
                       (5, 2, 6)),
}


def _randomise(model, seed):
    # The DiT zero-initialises its gates and output layer; random weights make every path count.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def _dit_rank(rank, world, case):
    from dancegrpo.distributed.sequence_parallel import all_reduce_grads

    kwargs, (t, hh, ww) = CASES[case]
    cfg = DiTConfig(**kwargs, attention_backend="sdpa")
    model = VideoDiT(cfg).double().train()
    _randomise(model, 1)
    g = torch.Generator().manual_seed(2)
    b, length = 2, 5
    x = torch.randn(b, cfg.in_channels, t, hh, ww, generator=g, dtype=torch.float64)
    text = torch.randn(b, length, cfg.text_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * length, [True, True, True, False, False]])
    timestep = torch.tensor([250.0, 800.0], dtype=torch.float64)
    first = torch.randn(b, cfg.in_channels, hh, ww, generator=g, dtype=torch.float64) if cfg.image_condition else None
    w = torch.randn(b, cfg.output_channels, t, hh, ww, generator=g, dtype=torch.float64)
    inputs = [x, text] + ([first] if first is not None else [])

    def run():
        for p in list(model.parameters()) + inputs:
            p.grad = None
        for i in inputs:
            i.requires_grad_()
        out = model(x, timestep, text, text_mask=mask, first_frame=first)
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, [i.grad.clone() for i in inputs]

    ref_out, ref_params, ref_inputs = run()
    model.set_sequence_parallel(torch.distributed.group.WORLD)
    assert model.sequence_parallel is not None and model.sequence_parallel.size == world
    out, _, _ = run()
    all_reduce_grads(model.parameters())
    params = {n: p.grad for n, p in model.named_parameters()}
    input_grads = [i.grad.clone() for i in inputs]
    for gr in input_grads:
        torch.distributed.all_reduce(gr)
    scale = max(ref_out.abs().max().item(), 1.0)
    param_err = max(_max_diff(params[n], ref_params[n]) / max(ref_params[n].abs().max().item(), 1.0)
                    for n in ref_params)
    input_err = max(_max_diff(a, r) / max(r.abs().max().item(), 1.0)
                    for a, r in zip(input_grads, ref_inputs, strict=True))
    nonzero = sum(int(gr.abs().max() > 0) for gr in ref_params.values())
    model.set_sequence_parallel(None)
    return _max_diff(out, ref_out) / scale, param_err, input_err, nonzero, len(ref_params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_dit_forward_backward_equals_single_process(case):
    results = run_ranks(_dit_rank, 2, case)
    for out_err, param_err, input_err, nonzero, total in results:
        assert nonzero == total  # every parameter has a gradient to compare
        assert out_err < TOL, out_err
        assert param_err < GRAD_TOL, param_err
        assert input_err < GRAD_TOL, input_err


def _heads_rank(rank, world):
    model = VideoDiT(DiTConfig(hidden_size=36, num_heads=3, depth=1))
    try:
        model.set_sequence_parallel(torch.distributed.group.WORLD)
    except ValueError as exc:
        return str(exc)
    return None


def test_heads_not_divisible_by_degree_is_one_line_error():
    for msg in run_ranks(_heads_rank, 2):
        assert msg == ("set_sequence_parallel: num_heads (3) must be divisible by the "
                       "sequence-parallel degree (2)")


def test_sequence_parallel_needs_an_initialised_process_group():
    from dancegrpo.distributed.sequence_parallel import SequenceParallel

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        SequenceParallel()


# ----------------------------------------------------------------------------- diffusers Wan
def _wan_rank(rank, world, grid, i2v=False):
    from dancegrpo.distributed.sequence_parallel import all_reduce_grads, apply_sequence_parallel
    from tests.diffusers_fixtures import _wan_parts

    # I2V (as the wan_i2v fixture): 36 input channels, CLIP image tokens with their own keys and
    # values; its attention takes the last 512 context tokens as the text
    parts = _wan_parts(36, 4, added_kv_proj_dim=24) if i2v else _wan_parts(16, None)
    model = parts["transformer"].double().train()
    _randomise(model, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 36 if i2v else 16, *grid, generator=g, dtype=torch.float64)
    text = torch.randn(2, 512 if i2v else 6, 32, generator=g, dtype=torch.float64)
    image = torch.randn(2, 5, 4, generator=g, dtype=torch.float64) if i2v else None
    timestep = torch.tensor([250.0, 800.0], dtype=torch.float64)
    w = torch.randn(2, 16, *grid, generator=g, dtype=torch.float64)

    def run():
        model.zero_grad(set_to_none=True)
        x.grad = None
        x.requires_grad_()
        out = model(x, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]
        (out * w).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad.clone()

    ref_out, ref_params, ref_x = run()
    assert apply_sequence_parallel(model, world) == 1
    try:
        out, params, x_grad = run()
    except ValueError as exc:
        return str(exc)
    all_reduce_grads(model.parameters())
    params = {n: p.grad for n, p in model.named_parameters()}
    torch.distributed.all_reduce(x_grad)
    param_err = max(_max_diff(params[n], ref_params[n]) / max(ref_params[n].abs().max().item(), 1.0)
                    for n in ref_params)
    return (_max_diff(out, ref_out) / max(ref_out.abs().max().item(), 1.0), param_err,
            _max_diff(x_grad, ref_x) / max(ref_x.abs().max().item(), 1.0))


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_sequence_parallel_wan_through_diffusers_context_parallel_equals_single_process(i2v):
    # (T, H, W) latent (2, 4, 4) -> 2 x 2 x 2 = 8 tokens of 1x2x2 patches, 4 per rank
    for out_err, param_err, input_err in run_ranks(_wan_rank, 2, (2, 4, 4), i2v):
        assert out_err < TOL, out_err
        assert param_err < GRAD_TOL, param_err
        assert input_err < GRAD_TOL, input_err


def test_sequence_parallel_wan_odd_token_count_is_one_line_error():
    # (3, 2, 6) -> 3 x 1 x 3 = 9 tokens: gloo has no uneven all-gather, so the split must be even
    for msg in run_ranks(_wan_rank, 2, (3, 2, 6)):
        assert msg == ("sequence_parallel: WanTransformer3DModel gets 9 video tokens per sample, not divisible "
                       "by the sequence-parallel degree 2 (choose frames / size so that it is)")


def _no_plan_rank(rank, world):
    from diffusers import HunyuanVideoTransformer3DModel

    from dancegrpo.distributed.sequence_parallel import apply_sequence_parallel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=32, rope_axes_dim=(2, 4, 4))
    try:
        apply_sequence_parallel(model, world)
    except ValueError as exc:
        return str(exc)


def test_sequence_parallel_diffusers_model_without_plan_is_one_line_error():
    for msg in run_ranks(_no_plan_rank, 2):
        assert msg == ("sequence_parallel: HunyuanVideoTransformer3DModel has no context-parallel plan in this "
                       "diffusers version; sequence parallelism supports our VideoDiT and diffusers models with "
                       "one (Wan)")


# ----------------------------------------------------------------------------- shipped config
SP_CONFIG = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs" / "shapes_t2v_sp.yaml"


def _config_model_rank(rank, world):
    import yaml

    from dancegrpo.distributed.sequence_parallel import apply_sequence_parallel
    from dancegrpo.registry import build_model

    raw = yaml.safe_load(SP_CONFIG.read_text())
    k = raw["distributed"]["sequence_parallel"]
    policy = build_model(raw["model"]["name"], **raw["model"]["kwargs"]).double().eval()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *policy.latent_shape(), generator=g, dtype=torch.float64)
    timesteps = torch.tensor([300.0, 700.0], dtype=torch.float64)
    with torch.no_grad():
        cond = policy.encode_prompts(["a red circle moves left", "two blue squares"])
        ref = policy.predict(latents, timesteps, cond)
        assert apply_sequence_parallel(policy, k) == 1
        out = policy.predict(latents, timesteps, cond)
        copied = copy.deepcopy(policy)  # an EMA or KL-reference copy keeps the group handle
        assert copied.dit.sequence_parallel is policy.dit.sequence_parallel
        out_copy = copied.predict(latents, timesteps, cond)
    return k, policy.dit.sequence_parallel.size, max(_max_diff(o, ref) / max(ref.abs().max().item(), 1.0)
                                                     for o in (out, out_copy))


def test_shipped_sequence_parallel_config_model_honours_the_degree():
    for k, size, err in run_ranks(_config_model_rank, 2):
        assert k == size == 2
        assert err < TOL, err


def test_apply_sequence_parallel_without_a_transformer_is_one_line_error():
    from dancegrpo.distributed.sequence_parallel import apply_sequence_parallel

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert apply_sequence_parallel(model, 1) == 0
    with pytest.raises(ValueError, match=r"^sequence_parallel: Sequential contains no transformer that supports"):
        apply_sequence_parallel(model, 2)
