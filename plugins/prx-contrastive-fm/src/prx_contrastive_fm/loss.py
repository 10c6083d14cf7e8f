"""The contrastive flow-matching term, in velocity space (objective-agnostic)."""

from __future__ import annotations

from typing import Protocol

import torch

from prx_core.flow import per_sample_mse, velocity_target


class VelocityObjective(Protocol):
    """The one method of :class:`prx_core.slots.Objective` this term needs.

    An objective that predicts x̂0 also has a public float ``t_clamp`` (x-prediction's 0.05): its
    target velocity is then (x_t − x0)/max(t, t_clamp), which :func:`rolled_target_velocity` reads.
    """

    def velocity(self, prediction_BCHW: torch.Tensor, x_t_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor: ...


def target_clamp(objective: object) -> float | None:
    """The objective's ``t_clamp`` when it forms its target as (x_t − x0)/max(t, t_clamp), else None."""
    clamp = getattr(objective, "t_clamp", None)
    if clamp is None:
        return None
    if isinstance(clamp, bool) or not isinstance(clamp, int | float) or not clamp > 0:
        raise TypeError(f"contrastive_fm: the objective's t_clamp must be a number > 0, got {clamp!r}")
    return float(clamp)


def rolled_target_velocity(
    x0_BCHW: torch.Tensor,
    noise_BCHW: torch.Tensor,
    x_t_BCHW: torch.Tensor,
    t_B: torch.Tensor,
    t_clamp: float | None,
) -> torch.Tensor:
    """The objective's target velocity of sample i − 1, at position i (``roll(·, 1, dim=0)``).

    Each neighbour keeps its own x_t and t, as rolling the objective's target tensor does (the
    reference rolls ``target`` itself, reference.md §8):

    * ``t_clamp`` None (velocity objectives): ε_{i−1} − x0_{i−1};
    * else (x-prediction): (x_t_{i−1} − x0_{i−1}) / max(t_{i−1}, t_clamp), which below t_clamp is
      t/t_clamp times ε − x0, the target that objective trains sample i − 1 towards.

    Every operation is elementwise, so this is bitwise the roll of the objective's own target.
    """
    x0_rolled_BCHW = torch.roll(x0_BCHW, 1, dims=0)
    if t_clamp is None:
        return velocity_target(x0_rolled_BCHW, torch.roll(noise_BCHW, 1, dims=0))
    t_rolled_B = torch.roll(t_B, 1, dims=0)
    t_B1 = t_rolled_B.clamp_min(t_clamp).reshape(-1, *([1] * (x_t_BCHW.dim() - 1)))
    return (torch.roll(x_t_BCHW, 1, dims=0) - x0_rolled_BCHW) / t_B1


def contrastive_mse(
    objective: VelocityObjective,
    prediction_BCHW: torch.Tensor,
    x0_BCHW: torch.Tensor,
    noise_BCHW: torch.Tensor,
    x_t_BCHW: torch.Tensor,
    t_B: torch.Tensor,
) -> torch.Tensor | None:
    """Mean over the batch of MSE(v̂_i, v_target_{i−1}), in fp32; None for a batch of one.

    ``roll(·, 1, dim=0)`` pairs sample i with sample i − 1 (sample 0 with the last one); the
    target is the objective's own (:func:`rolled_target_velocity`).
    """
    batch = prediction_BCHW.shape[0]
    if batch < 2:
        return None
    v_pred_BCHW = objective.velocity(prediction_BCHW, x_t_BCHW, t_B)
    v_rolled_BCHW = rolled_target_velocity(x0_BCHW, noise_BCHW, x_t_BCHW, t_B, target_clamp(objective))
    # Core's per-sample MSE computes in fp32 whatever autocast produced; every sample has the
    # same number of elements, so the mean of per-sample means is the plain MSE over the batch.
    return per_sample_mse(v_pred_BCHW, v_rolled_BCHW).mean()
