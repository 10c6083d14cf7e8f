"""Objective maths against hand-computed values, and the timestep distribution."""

from __future__ import annotations

import math

import pytest
import torch

from prx_core.flow import (
    interpolate,
    per_sample_mse,
    sample_timesteps,
    shift_timesteps,
    timestep_grid,
    velocity_target,
    x0_from_velocity,
)
from prx_core.sampling import classifier_free_guidance, euler_sample


def test_shift_by_hand() -> None:
    # s = 3: t' = 3t / (1 + 2t). t = 0.5 -> 1.5 / 2 = 0.75; t = 0.25 -> 0.75 / 1.5 = 0.5.
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)
    with pytest.raises(ValueError, match="shift"):
        shift_timesteps(t, 0.0)


def test_interpolation_velocity_and_x0_by_hand() -> None:
    x0 = torch.tensor([[[[1.0, -2.0]]]])
    eps = torch.tensor([[[[3.0, 0.5]]]])
    t = torch.tensor([0.25])
    # x_t = 0.75 * x0 + 0.25 * eps = [0.75 + 0.75, -1.5 + 0.125]
    x_t = interpolate(x0, eps, t)
    assert torch.allclose(x_t, torch.tensor([[[[1.5, -1.375]]]]))
    v = velocity_target(x0, eps)
    assert torch.equal(v, torch.tensor([[[[2.0, 2.5]]]]))
    assert torch.allclose(x0_from_velocity(x_t, v, t), x0)
    # MSE per sample: mean of (1-0)^2 and (3-1)^2 = 2.5
    assert torch.allclose(per_sample_mse(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])), torch.tensor([2.5]))


def test_timestep_distribution_matches_logit_normal_mixture() -> None:
    n = 200_000
    t = sample_timesteps(n, torch.Generator().manual_seed(0), shift=1.0, uniform_prob=0.1)
    assert t.min() >= 1e-3 and t.max() < 1.0
    # Independent reference: the CDF of the mixture at a few points.
    # P(t <= x) = 0.9 * Phi(logit(x)) + 0.1 * (x - 1e-3) / (1 - 1e-3)
    for x in (0.1, 0.3, 0.5, 0.8):
        phi = 0.5 * (1 + math.erf(math.log(x / (1 - x)) / math.sqrt(2)))
        expected = 0.9 * phi + 0.1 * (x - 1e-3) / (1 - 1e-3)
        assert abs((t <= x).float().mean().item() - expected) < 0.005


def test_shifted_distribution_moves_mass_to_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    t = sample_timesteps(100_000, gen, shift=3.0, uniform_prob=0.0)
    # Median of sigmoid(N(0,1)) is 0.5; shifted by 3 it is 0.75.
    assert abs(t.median().item() - 0.75) < 0.01


def test_sampling_is_reproducible_and_validated() -> None:
    a = sample_timesteps(16, torch.Generator().manual_seed(5))
    b = sample_timesteps(16, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="uniform_prob"):
        sample_timesteps(4, torch.Generator(), uniform_prob=1.5)


def test_grid_is_shifted_linspace() -> None:
    grid = timestep_grid(4, 1.0)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    shifted = timestep_grid(2, 3.0)
    assert torch.allclose(shifted, torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))


def test_cfg_by_hand() -> None:
    def velocity(x, t, states, mask):
        # conditional rows have states = 1, unconditional rows states = 0
        return x * 0 + states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * 2.0 + 1.0

    x = torch.zeros(2, 1, 1, 1)
    cond = (torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    uncond = (torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    out = classifier_free_guidance(velocity, x, torch.zeros(2), cond, uncond, scale=3.0)
    # u = 1, c = 3 -> 1 + 3 * (3 - 1) = 7
    assert torch.allclose(out, torch.full((2, 1, 1, 1), 7.0))


def test_euler_recovers_x0_for_exact_velocity() -> None:
    # For a single data point x0, the exact velocity field is v(x, t) = (x - x0) / t.
    x0 = torch.tensor([[[[0.3, -0.7]]]])
    noise = torch.tensor([[[[1.0, 2.0]]]])

    def velocity(x, t, states, mask):
        return (x - x0) / t.reshape(-1, 1, 1, 1)

    cond = (torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))
    out = euler_sample(velocity, noise, cond, cond, steps=7, cfg=1.0, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-6)


class _RecordingVelocity:
    """v = 1 + 2·mean(states) per row (conditional rows have states 1, unconditional rows 0), and a
    record of the states of every row of every call."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.calls.append(states.mean(dim=(1, 2)))
        return x * 0 + states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * 2.0 + 1.0


def _cond_uncond(batch: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    cond = (torch.ones(batch, 3, 4), torch.ones(batch, 3, dtype=torch.bool))
    uncond = (torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    return cond, uncond


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0, -2.0])
def test_cfg_at_or_below_one_runs_the_conditional_model_alone(scale: float) -> None:
    # The public code guides only above 1 (reference.md §8): at s ≤ 1 one forward, conditional rows only,
    # and its output as it is. The formula u + s·(c − u) would give 1 + 2s here (1 at s = 0), not 3.
    velocity = _RecordingVelocity()
    cond, uncond = _cond_uncond(2)
    out = classifier_free_guidance(velocity, torch.zeros(2, 1, 1, 1), torch.zeros(2), cond, uncond, scale=scale)
    assert len(velocity.calls) == 1 and torch.equal(velocity.calls[0], torch.ones(2))
    assert torch.equal(out, torch.full((2, 1, 1, 1), 3.0))


def test_cfg_above_one_runs_both_branches_in_one_forward() -> None:
    velocity = _RecordingVelocity()
    cond, uncond = _cond_uncond(2)
    out = classifier_free_guidance(velocity, torch.zeros(2, 1, 1, 1), torch.zeros(2), cond, uncond, scale=1.5)
    assert len(velocity.calls) == 1 and torch.equal(velocity.calls[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # u = 1, c = 3 -> 1 + 1.5 * (3 - 1) = 4
    assert torch.equal(out, torch.full((2, 1, 1, 1), 4.0))


def test_euler_sampling_at_cfg_zero_never_runs_the_unconditional_branch() -> None:
    velocity = _RecordingVelocity()
    cond, uncond = _cond_uncond(3)
    out = euler_sample(velocity, torch.zeros(3, 1, 1, 1), cond, uncond, steps=4, cfg=0.0)
    assert len(velocity.calls) == 4 and all(torch.equal(c, torch.ones(3)) for c in velocity.calls)
    # v = 3 at every step, integrated from t = 1 to 0: x = 0 + (0 − 1)·3 = −3 (not −1, the unconditional v).
    assert torch.allclose(out, torch.full((3, 1, 1, 1), -3.0))


class _PerSampleSpy:
    """A per-sample guidance: records the keys it is bound to and the steps the bound copy runs."""

    def __init__(self) -> None:
        self.bound: list[tuple[int, list[int]]] = []
        self.steps = 0

    def for_samples(self, seed: int, sample_keys: list[int]) -> _PerSampleSpy:
        self.bound.append((seed, list(sample_keys)))
        return self

    def __call__(self, velocity, x, t_B, cond, uncond):  # type: ignore[no-untyped-def]
        if not self.bound:
            raise AssertionError("called before for_samples")
        self.steps += 1
        return torch.zeros_like(x)


def test_a_per_sample_guidance_learns_the_keys_once_before_the_first_step() -> None:
    spy = _PerSampleSpy()
    cond, uncond = _cond_uncond(2)
    euler_sample(
        _RecordingVelocity(),
        torch.zeros(2, 1, 1, 1),
        cond,
        uncond,
        3,
        4.0,
        guidance=spy,
        sample_keys=[7, 2],
        sample_seed=9,
    )
    assert spy.bound == [(9, [7, 2])] and spy.steps == 3
    # Without keys the batch positions stand in; a mismatched key list is refused.
    euler_sample(_RecordingVelocity(), torch.zeros(2, 1, 1, 1), cond, uncond, 1, 4.0, guidance=spy)
    assert spy.bound[-1] == (0, [0, 1])
    with pytest.raises(ValueError, match="sample_keys has 1 keys for a batch of 2"):
        euler_sample(_RecordingVelocity(), torch.zeros(2, 1, 1, 1), cond, uncond, 1, 4.0, guidance=spy, sample_keys=[1])


def test_a_plain_guidance_without_sample_keys_is_called_as_it_is() -> None:
    calls: list[int] = []

    def guidance(velocity, x, t_B, cond, uncond):  # type: ignore[no-untyped-def]
        calls.append(x.shape[0])
        return torch.ones_like(x)

    cond, uncond = _cond_uncond(2)
    out = euler_sample(_RecordingVelocity(), torch.zeros(2, 1, 1, 1), cond, uncond, 2, 4.0, guidance=guidance)
    assert calls == [2, 2] and torch.allclose(out, torch.full((2, 1, 1, 1), -1.0))
