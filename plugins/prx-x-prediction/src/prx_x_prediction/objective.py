"""The x-prediction objective (JiT, arXiv 2511.13720) and its pure maths.

Convention (core's, :mod:`prx_core.flow`): x_t = (1 − t)·x0 + t·ε, t = 1 is noise, the sampler
integrates v = ε − x0. A model that predicts x̂0 defines the velocity

    v(x̂0) = (x_t − x̂0) / max(t, t_clamp),

which equals ε − x0 exactly when x̂0 = x0 and t ≥ t_clamp. Below t_clamp the division is
clamped, as in JiT, because 1/t would amplify any x̂0 error without bound near the data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prx_core.flow import per_sample_mse, sample_timesteps
from prx_core.keys import X0_PREDICTION

if TYPE_CHECKING:
    from prx_core.context import StepContext
    from prx_x_prediction import XPredictionConfig


def velocity_from_x0(x_t_BCHW: torch.Tensor, x_BCHW: torch.Tensor, t_B: torch.Tensor, t_clamp: float) -> torch.Tensor:
    """v = (x_t − x) / max(t, t_clamp), per sample.

    ``t`` keeps its own dtype (fp32 from the sampler and the timestep draw) instead of being cast
    to the image dtype, so type promotion performs the 1/t amplification in t's precision even
    when the images are bf16.
    """
    if t_clamp <= 0:
        raise ValueError(f"t_clamp must be > 0, got {t_clamp}")
    t_B1 = t_B.clamp_min(t_clamp).reshape(-1, *([1] * (x_t_BCHW.dim() - 1)))
    return (x_t_BCHW - x_BCHW) / t_B1


class XPrediction:
    """The model predicts x̂0; the loss is the per-sample MSE between the implied velocities."""

    def __init__(self, config: XPredictionConfig) -> None:
        self.config = config
        self.caption_dropout = config.caption_dropout
        self.shift = config.shift
        #: Public: the lower bound on t in v = (x_t − x)/max(t, t_clamp). Loss terms that work in
        #: velocity space (contrastive flow matching) read it to form this objective's target
        #: velocity (x_t − x0)/max(t, t_clamp) for other samples, without importing this plugin.
        self.t_clamp = config.t_clamp

    def sample_timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        # Same draw as core's flow_matching, so an x- vs v-prediction ablation sees the same t.
        t_B = sample_timesteps(n, generator, self.config.shift, self.config.uniform_prob, self.config.t_min)
        return t_B.to(device)

    def loss(self, step: StepContext, prediction_BCHW: torch.Tensor) -> torch.Tensor:
        # The raw output is x̂0: publish it unchanged so perceptual losses (LPIPS, P-DINO) get
        # gradients straight into the network output.
        step.stash[X0_PREDICTION] = prediction_BCHW
        clamp = self.t_clamp
        v_pred_BCHW = velocity_from_x0(step.x_t_BCHW, prediction_BCHW, step.t_B, clamp)
        v_target_BCHW = velocity_from_x0(step.x_t_BCHW, step.x0_BCHW, step.t_B, clamp)
        return per_sample_mse(v_pred_BCHW, v_target_BCHW)

    def velocity(self, prediction_BCHW: torch.Tensor, x_t_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        return velocity_from_x0(x_t_BCHW, prediction_BCHW, t_B, self.t_clamp)
