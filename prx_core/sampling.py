"""Deterministic Euler sampling with classifier-free guidance (reference.md §2)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prx_core.flow import timestep_grid
from prx_core.slots import Guidance, PerSampleGuidance

#: velocity(x_t, t_B, states_BLD, mask_BL) -> v, with the sampling weights.
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_free_guidance(
    velocity: VelocityFn,
    x_t_BCHW: torch.Tensor,
    t_B: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """out = u + s·(c − u) for s > 1, in one batched forward for both branches.

    For s ≤ 1 (1, 0, anything below) the conditional branch runs alone and is returned as it is:
    no unconditional forward and no guidance formula, so s = 0 does *not* give unconditional
    samples. That is what the public code does (it guides only when the scale is above 1,
    reference.md §8).
    """
    if scale <= 1.0:
        return velocity(x_t_BCHW, t_B, *cond)
    batch = x_t_BCHW.shape[0]
    states = torch.cat([cond[0], uncond[0].expand(batch, -1, -1)])
    mask = torch.cat([cond[1], uncond[1].expand(batch, -1)])
    v_2B = velocity(torch.cat([x_t_BCHW, x_t_BCHW]), torch.cat([t_B, t_B]), states, mask)
    v_cond, v_uncond = v_2B.chunk(2)
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(
    velocity: VelocityFn,
    noise_BCHW: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    uncond: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    cfg: float,
    shift: float = 1.0,
    guidance: Guidance | None = None,
    sample_keys: Sequence[int] | None = None,
    sample_seed: int = 0,
) -> torch.Tensor:
    """Integrate from t = 1 (``noise``) to t = 0 on the shifted grid; returns x0 in latent space.

    ``cfg`` is the classifier-free guidance scale (see :func:`classifier_free_guidance`: at
    ``cfg`` ≤ 1 the conditional model runs alone). ``guidance`` replaces CFG when a plugin
    provides one (e.g. TREAD self-guidance); ``cfg`` is then unused.

    ``sample_keys`` names each sample (``Trainer.generate`` passes its noise indices) and
    ``sample_seed`` the generation's noise seed. A :class:`~prx_core.slots.PerSampleGuidance`
    learns them once, before the first step, so its random draws (TREAD's routes) follow each
    sample, not its position in the batch, and stay the same for every step. Without keys the
    batch positions 0..B−1 stand in, which ties such draws to the position.
    """
    grid = timestep_grid(steps, shift)
    x = noise_BCHW
    batch = x.shape[0]
    keys = list(range(batch)) if sample_keys is None else list(sample_keys)
    if len(keys) != batch:
        raise ValueError(f"sample_keys has {len(keys)} keys for a batch of {batch} samples")
    if isinstance(guidance, PerSampleGuidance):
        guidance = guidance.for_samples(sample_seed, keys)
    for i in range(steps):
        t_B = torch.full((batch,), float(grid[i]), device=x.device, dtype=torch.float32)
        if guidance is not None:
            v = guidance(velocity, x, t_B, cond, uncond)
        else:
            v = classifier_free_guidance(velocity, x, t_B, cond, uncond, cfg)
        x = x + float(grid[i + 1] - grid[i]) * v.to(x.dtype)
    return x
