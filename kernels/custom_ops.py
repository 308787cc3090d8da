"""The Triton launchers as ``torch.ops.dancegrpo_triton.*`` custom ops (schemas: ops/compiled.py).

Each op gets a fake implementation (shapes and dtypes only) so ``torch.compile`` traces through
it without a graph break. The ops accept inputs of any strides (the launchers copy a strided input
once) and return contiguous outputs, which is what the fakes report; the backward formulas are attached by
``dancegrpo.ops.compiled.register_autograd("dancegrpo_triton")``, which the backend calls once
after importing this module. Importing this module is the registration: the ``"triton"``
backend does it on first use, never ``import dancegrpo``.

``sample_step_rng`` is the variant with in-kernel noise: its noise is a pure function of the
1-element int64 ``seed`` tensor (see sample_step.py), so it is a functional op that opcheck and
torch.compile can treat like any other.
"""

import torch
from torch import Tensor

from .advantages import group_advantages_fwd
from .nft_loss import nft_loss_bwd, nft_loss_fwd
from .policy_loss import policy_loss_bwd, policy_loss_fwd
from .sample_step import sample_step_fwd
from .step_logprob import logprob_bwd, logprob_fwd

NAMESPACE = "dancegrpo_triton"
_F32 = torch.float32


def _op(name: str, schema: str):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)


@_op("logprob_fwd", "(Tensor v, Tensor x, Tensor y, Tensor? v_ref, Tensor a, Tensor b, Tensor std, "
                    "bool sum) -> (Tensor, Tensor)")
def _logprob_fwd(v: Tensor, x: Tensor, y: Tensor, v_ref: Tensor | None, a: Tensor, b: Tensor, std: Tensor,
                 sum: bool) -> tuple[Tensor, Tensor]:
    return logprob_fwd(v, x, y, v_ref, a, b, std, sum)


@_logprob_fwd.register_fake
def _(v, x, y, v_ref, a, b, std, sum):
    batch = v.shape[0]
    return v.new_empty((batch,), dtype=_F32), v.new_empty((batch if v_ref is not None else 0,), dtype=_F32)


@_op("logprob_bwd", "(Tensor g_logp, Tensor? g_msd, Tensor v, Tensor x, Tensor y, Tensor? v_ref, Tensor a, "
                    "Tensor b, Tensor std, bool sum, bool need_v, bool need_x, bool need_y) "
                    "-> (Tensor, Tensor, Tensor)")
def _logprob_bwd(g_logp: Tensor, g_msd: Tensor | None, v: Tensor, x: Tensor, y: Tensor, v_ref: Tensor | None,
                 a: Tensor, b: Tensor, std: Tensor, sum: bool, need_v: bool, need_x: bool,
                 need_y: bool) -> tuple[Tensor, Tensor, Tensor]:
    return logprob_bwd(g_logp, g_msd, v, x, y, v_ref, a, b, std, sum, need_v, need_x, need_y)


@_logprob_bwd.register_fake
def _(g_logp, g_msd, v, x, y, v_ref, a, b, std, sum, need_v, need_x, need_y):
    pick = lambda t, need: t.new_empty(t.shape if need else (0,))
    return pick(v, need_v), pick(x, need_x), pick(y, need_y)


@_op("sample_step", "(Tensor v, Tensor x, Tensor noise, Tensor a, Tensor b, Tensor std, bool sum) "
                    "-> (Tensor, Tensor)")
def _sample_step(v: Tensor, x: Tensor, noise: Tensor, a: Tensor, b: Tensor, std: Tensor,
                 sum: bool) -> tuple[Tensor, Tensor]:
    return sample_step_fwd(v, x, noise, None, a, b, std, sum)


@_sample_step.register_fake
def _(v, x, noise, a, b, std, sum):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=_F32)


@_op("sample_step_rng", "(Tensor v, Tensor x, Tensor seed, Tensor a, Tensor b, Tensor std, bool sum) "
                        "-> (Tensor, Tensor)")
def _sample_step_rng(v: Tensor, x: Tensor, seed: Tensor, a: Tensor, b: Tensor, std: Tensor,
                     sum: bool) -> tuple[Tensor, Tensor]:
    return sample_step_fwd(v, x, None, seed, a, b, std, sum)


@_sample_step_rng.register_fake
def _(v, x, seed, a, b, std, sum):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=_F32)


@_op("group_advantages", "(Tensor rewards, Tensor weights, int group_size, int std_mode, bool unbiased, "
                         "float eps, float clip, bool aggregate_reward, bool drop_nonfinite) -> Tensor")
def _group_advantages(rewards: Tensor, weights: Tensor, group_size: int, std_mode: int, unbiased: bool,
                      eps: float, clip: float, aggregate_reward: bool, drop_nonfinite: bool) -> Tensor:
    return group_advantages_fwd(rewards, weights, group_size, std_mode, unbiased, eps, clip, aggregate_reward,
                                drop_nonfinite)


@_group_advantages.register_fake
def _(rewards, weights, group_size, std_mode, unbiased, eps, clip, aggregate_reward, drop_nonfinite):
    return rewards.new_empty((rewards.shape[0],), dtype=_F32)


@_op("policy_loss_fwd", "(Tensor logp, Tensor old_logp, Tensor adv, Tensor? ref_logp, float clip_low, "
                        "float clip_high, float beta, int reduction) -> (Tensor, Tensor)")
def _policy_loss_fwd(logp: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor | None, clip_low: float,
                     clip_high: float, beta: float, reduction: int) -> tuple[Tensor, Tensor]:
    return policy_loss_fwd(logp, old_logp, adv, ref_logp, clip_low, clip_high, beta, reduction)


@_policy_loss_fwd.register_fake
def _(logp, old_logp, adv, ref_logp, clip_low, clip_high, beta, reduction):
    shape = (logp.shape[0],) if reduction == 2 else ()
    return logp.new_empty(shape, dtype=_F32), logp.new_empty((3,), dtype=_F32)


@_op("policy_loss_bwd", "(Tensor g_loss, Tensor logp, Tensor old_logp, Tensor adv, Tensor? ref_logp, "
                        "float clip_low, float clip_high, float beta, int reduction) -> Tensor")
def _policy_loss_bwd(g_loss: Tensor, logp: Tensor, old_logp: Tensor, adv: Tensor, ref_logp: Tensor | None,
                     clip_low: float, clip_high: float, beta: float, reduction: int) -> Tensor:
    return policy_loss_bwd(g_loss, logp, old_logp, adv, ref_logp, clip_low, clip_high, beta, reduction)


@_policy_loss_bwd.register_fake
def _(g_loss, logp, old_logp, adv, ref_logp, clip_low, clip_high, beta, reduction):
    return logp.new_empty(logp.shape)


@_op("nft_loss_fwd", "(Tensor v, Tensor v_old, Tensor target, Tensor r, Tensor t, float beta, float eps, "
                     "bool adaptive) -> (Tensor, Tensor)")
def _nft_loss_fwd(v: Tensor, v_old: Tensor, target: Tensor, r: Tensor, t: Tensor, beta: float, eps: float,
                  adaptive: bool) -> tuple[Tensor, Tensor]:
    return nft_loss_fwd(v, v_old, target, r, t, beta, eps, adaptive)


@_nft_loss_fwd.register_fake
def _(v, v_old, target, r, t, beta, eps, adaptive):
    batch = v.shape[0]
    return v.new_empty((batch,), dtype=_F32), v.new_empty((batch, 5), dtype=_F32)


@_op("nft_loss_bwd", "(Tensor g_per, Tensor v, Tensor v_old, Tensor target, Tensor r, Tensor t, Tensor parts, "
                     "float beta, bool adaptive) -> Tensor")
def _nft_loss_bwd(g_per: Tensor, v: Tensor, v_old: Tensor, target: Tensor, r: Tensor, t: Tensor, parts: Tensor,
                  beta: float, adaptive: bool) -> Tensor:
    return nft_loss_bwd(g_per, v, v_old, target, r, t, parts, beta, adaptive)


@_nft_loss_bwd.register_fake
def _(g_per, v, v_old, target, r, t, parts, beta, adaptive):
    return v.new_empty(v.shape)
