"""dancegrpo: GRPO for image and video generators (DanceGRPO, Flow-GRPO) with fused kernels.

``import dancegrpo`` stays light: it imports torch, never initialises CUDA, never compiles
or loads a kernel. Backends load on first use; models, worlds and the trainer are submodules.
"""

from .coeffs import StepCoeffs, ddim_coeffs, flow_schedule, flow_sde_coeffs
from .functional import (
    clipped_ratio_loss,
    group_advantages,
    grpo_step_loss,
    nft_loss,
    ode_step,
    sample_step,
    step_logprob,
)
from .nn import GRPOStepLoss

__version__ = "0.1.0"

__all__ = [
    "StepCoeffs", "flow_sde_coeffs", "ddim_coeffs", "flow_schedule",
    "step_logprob", "sample_step", "ode_step", "group_advantages", "clipped_ratio_loss", "grpo_step_loss", "nft_loss",
    "GRPOStepLoss", "__version__",
]
