"""The velocity objective (reference.md §2), core's default ``objective`` entry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prx_core.flow import per_sample_mse, sample_timesteps, velocity_target, x0_from_velocity
from prx_core.keys import X0_PREDICTION

if TYPE_CHECKING:
    from prx_core.builtins.flow_matching import FlowMatchingConfig
    from prx_core.context import StepContext


class FlowMatching:
    """The model predicts v = ε − x0; the loss is plain MSE over all elements of each sample."""

    def __init__(self, config: FlowMatchingConfig) -> None:
        self.config = config
        self.caption_dropout = config.caption_dropout
        self.shift = config.shift

    def sample_timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        t_B = sample_timesteps(n, generator, self.config.shift, self.config.uniform_prob, self.config.t_min)
        return t_B.to(device)

    def loss(self, step: StepContext, prediction_BCHW: torch.Tensor) -> torch.Tensor:
        step.stash[X0_PREDICTION] = x0_from_velocity(step.x_t_BCHW, prediction_BCHW, step.t_B)
        return per_sample_mse(prediction_BCHW, velocity_target(step.x0_BCHW, step.noise_BCHW))

    def velocity(self, prediction_BCHW: torch.Tensor, x_t_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        return prediction_BCHW
