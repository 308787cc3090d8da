"""Fused Triton kernels for the GRPO ops, installed as ``dancegrpo.kernels``.

One module per op family, each holding its ``@triton.jit`` kernels (``_op_fwd_kernel``) and
their launchers (``op_fwd``: grid, block sizes, output allocation):

* ``step_logprob``: split-reduction log-prob forward, deterministic combine, elementwise backward.
* ``sample_step``: the rollout step (mean, noise or in-kernel Philox noise, log-prob) in one pass.
* ``advantages``: group-normalised advantages, one launch.
* ``policy_loss``: clipped surrogate + k3 KL forward and backward, one launch each.
* ``nft_loss``: DiffusionNFT's two implicit-policy MSEs, weights and statistics in one pass; one-pass backward.
* ``custom_ops``: registers the launchers as ``torch.ops.dancegrpo_triton.*`` custom ops.

Nothing is imported here: importing a submodule imports Triton and defines the kernels
(without compiling anything); the ``"triton"`` backend does that on first use.
"""
