"""Rectified-flow maths (reference.md §2). Pure functions, unit-tested against hand-computed values.

Convention: x_t = (1 − t)·x0 + t·ε, with t = 1 pure noise; the velocity is v = ε − x0, so
dx/dt = v and an Euler step from t to t' < t is x ← x + (t' − t)·v.
"""

from __future__ import annotations

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s·t / (1 + (s − 1)·t). s > 1 moves mass towards noise (used at high resolution)."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(
    n: int,
    generator: torch.Generator,
    shift: float = 1.0,
    uniform_prob: float = 0.1,
    t_min: float = 1e-3,
) -> torch.Tensor:
    """Training timesteps t_B, float32 on the generator's device.

    Logit-normal draws sigmoid(N(0, 1)), shifted, kept in [t_min, 1); each one is replaced with
    probability ``uniform_prob`` by an unshifted uniform draw in [t_min, 1). The three random
    tensors are drawn in a fixed order (normal, mix mask, uniform) so results are reproducible.
    """
    if not 0.0 <= uniform_prob <= 1.0:
        raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
    if not 0.0 <= t_min < 1.0:
        raise ValueError(f"t_min must be in [0, 1), got {t_min}")
    device = generator.device
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    logit_normal_B = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    shifted_B = shift_timesteps(logit_normal_B, shift).clamp(t_min, below_one)
    use_uniform_B = torch.rand(n, generator=generator, device=device) < uniform_prob
    uniform_B = t_min + (1.0 - t_min) * torch.rand(n, generator=generator, device=device)
    return torch.where(use_uniform_B, uniform_B, shifted_B)


def _per_sample(t_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t_B.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0_BCHW: torch.Tensor, noise_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    t = _per_sample(t_B, x0_BCHW)
    return (1 - t) * x0_BCHW + t * noise_BCHW


def velocity_target(x0_BCHW: torch.Tensor, noise_BCHW: torch.Tensor) -> torch.Tensor:
    return noise_BCHW - x0_BCHW


def x0_from_velocity(x_t_BCHW: torch.Tensor, v_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """x̂0 = x_t − t·v, exact for the straight path."""
    return x_t_BCHW - _per_sample(t_B, x_t_BCHW) * v_BCHW


def per_sample_mse(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, computed in fp32 whatever the autocast dtype."""
    return (a_BCHW.float() - b_BCHW.float()).pow(2).flatten(1).mean(dim=1)


def timestep_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The sampler's grid: linspace(1 → 0, steps + 1), shifted like training (float64 for accuracy)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
