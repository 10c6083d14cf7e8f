"""The contrastive flow-matching term, in velocity space (objective-agnostic)."""

from __future__ import annotations

from typing import Protocol

import torch

from prx_core.flow import per_sample_mse, velocity_target


class VelocityObjective(Protocol):
    """The one method of :class:`prx_core.slots.Objective` this term needs."""

    def velocity(self, prediction_BCHW: torch.Tensor, x_t_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor: ...


def contrastive_mse(
    objective: VelocityObjective,
    prediction_BCHW: torch.Tensor,
    x0_BCHW: torch.Tensor,
    noise_BCHW: torch.Tensor,
    x_t_BCHW: torch.Tensor,
    t_B: torch.Tensor,
) -> torch.Tensor | None:
    """Mean over the batch of MSE(v̂_i, ε_{i−1} − x0_{i−1}), in fp32; None for a batch of one.

    ``roll(·, 1, dim=0)`` pairs sample i with sample i − 1 (sample 0 with the last one). Rolling
    x0 and ε together before forming ε − x0 is the same as rolling the velocity target.
    """
    batch = prediction_BCHW.shape[0]
    if batch < 2:
        return None
    v_pred_BCHW = objective.velocity(prediction_BCHW, x_t_BCHW, t_B)
    v_rolled_BCHW = velocity_target(torch.roll(x0_BCHW, 1, dims=0), torch.roll(noise_BCHW, 1, dims=0))
    # Core's per-sample MSE computes in fp32 whatever autocast produced; every sample has the
    # same number of elements, so the mean of per-sample means is the plain MSE over the batch.
    return per_sample_mse(v_pred_BCHW, v_rolled_BCHW).mean()
