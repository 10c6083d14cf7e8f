"""Unit tests for the ``x_prediction`` objective, against hand-computed values."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prx_x_prediction import INFO, XPredictionConfig, _build
from prx_x_prediction.objective import XPrediction, velocity_from_x0

from prx_core.config import RecipeError, bind
from prx_core.flow import interpolate
from prx_core.flow import sample_timesteps as core_sample_timesteps
from prx_core.keys import X0_PREDICTION, Stash
from prx_core.sampling import euler_sample
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe

CPU = torch.device("cpu")


def _objective(**kwargs: float) -> XPrediction:
    return _build(XPredictionConfig(**kwargs), SimpleNamespace(device=CPU))


def _step(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
    """The StepContext fields the objective reads."""
    return SimpleNamespace(x0_BCHW=x0, noise_BCHW=noise, t_B=t, x_t_BCHW=interpolate(x0, noise, t), stash=Stash())


def test_velocity_from_x0_hand_values_including_clamp() -> None:
    # Two samples of one element: t = 0.5 (no clamp) and t = 0.01 (clamped to 0.05).
    x_t = torch.tensor([3.0, 1.0]).reshape(2, 1, 1, 1)
    x = torch.tensor([1.0, 0.5]).reshape(2, 1, 1, 1)
    t = torch.tensor([0.5, 0.01])
    v = velocity_from_x0(x_t, x, t, 0.05)
    # (3 − 1) / 0.5 = 4 ; (1 − 0.5) / max(0.01, 0.05) = 0.5 / 0.05 = 10
    torch.testing.assert_close(v.flatten(), torch.tensor([4.0, 10.0]))
    # t exactly at the clamp is not changed; a larger clamp applies to both.
    torch.testing.assert_close(
        velocity_from_x0(x_t, x, torch.tensor([0.05, 0.05]), 0.05).flatten(), torch.tensor([40.0, 10.0])
    )
    torch.testing.assert_close(velocity_from_x0(x_t, x, t, 1.0).flatten(), torch.tensor([2.0, 0.5]))


def test_velocity_from_x0_rejects_bad_clamp() -> None:
    one = torch.ones(1, 1, 1, 1)
    with pytest.raises(ValueError, match="t_clamp"):
        velocity_from_x0(one, one, torch.ones(1), 0.0)


def test_loss_hand_values_above_and_below_clamp() -> None:
    objective = _objective()
    # One channel, two pixels per sample.
    x0 = torch.tensor([[1.0, -1.0], [2.0, 0.0]]).reshape(2, 1, 1, 2)
    noise = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).reshape(2, 1, 1, 2)
    t = torch.tensor([0.5, 0.02])
    pred = torch.tensor([[0.0, -1.0], [1.5, 0.5]]).reshape(2, 1, 1, 2)
    step = _step(x0, noise, t)
    loss = objective.loss(step, pred)
    # v_pred − v_target = (x0 − x̂0) / max(t, 0.05):
    #   sample 0, t = 0.5:  [(1 − 0)/0.5, (−1 + 1)/0.5] = [2, 0]       -> mean sq = (4 + 0)/2 = 2
    #   sample 1, t = 0.02 -> 0.05: [(2 − 1.5)/0.05, (0 − 0.5)/0.05] = [10, −10] -> mean sq = 100
    torch.testing.assert_close(loss, torch.tensor([2.0, 100.0]))
    assert loss.shape == (2,)


def test_target_is_epsilon_minus_x0_above_clamp() -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.05, 0.3, 0.99])
    x_t = interpolate(x0, noise, t)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, t, 0.05), noise - x0, rtol=1e-5, atol=1e-5)


def test_perfect_x0_gives_zero_loss_and_is_published_raw() -> None:
    objective = _objective()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.001, 0.04, 0.5, 0.999])  # both sides of the clamp
    step = _step(x0, noise, t)
    pred = x0.clone().requires_grad_(True)
    loss = objective.loss(step, pred)
    assert torch.equal(loss, torch.zeros(4))
    # The stash holds the network output itself (same tensor, gradients flow into it).
    assert step.stash[X0_PREDICTION] is pred
    step.stash[X0_PREDICTION].sum().backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.ones_like(pred))


def test_loss_is_fp32_for_bf16_inputs() -> None:
    objective = _objective()
    x0 = torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16)
    noise = torch.ones(2, 1, 2, 2, dtype=torch.bfloat16)
    # t = 2^-5 keeps x_t = t and x_t − 0.5 exact in bf16, so only the fp32 division is inexact.
    step = _step(x0, noise, torch.tensor([0.5, 0.03125]))
    loss = objective.loss(step, torch.full((2, 1, 2, 2), 0.5, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    # v_pred − v_target = (x0 − x̂0)/max(t, 0.05): (0 − 0.5)/0.5 = −1 -> 1 ; (0 − 0.5)/0.05 = −10 -> 100
    torch.testing.assert_close(loss, torch.tensor([1.0, 100.0]))


def test_sample_timesteps_reuses_core_draw() -> None:
    objective = _objective(shift=3.0, uniform_prob=0.2, t_min=0.01)
    ours = objective.sample_timesteps(64, torch.Generator().manual_seed(7), CPU)
    core = core_sample_timesteps(64, torch.Generator().manual_seed(7), 3.0, 0.2, 0.01)
    assert torch.equal(ours, core)
    assert ours.min() >= 0.01 and ours.max() < 1.0


@pytest.mark.parametrize(("steps", "shift"), [(10, 1.0), (4, 3.0), (1, 1.0)])
def test_sampling_with_exact_x0_recovers_the_data_point(steps: int, shift: float) -> None:
    # Every grid point except the final 0 is >= 0.1 here, above the clamp, so each Euler step
    # lands exactly on the straight path and the last one on x0.
    objective = _objective(shift=shift)
    g = torch.Generator().manual_seed(3)
    data = torch.randn(1, 3, 4, 4, generator=g)
    noise = torch.randn(1, 3, 4, 4, generator=g)
    cond = (torch.zeros(1, 2, 5), torch.ones(1, 2, dtype=torch.bool))

    def velocity(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # The optimal x̂0 for a one-point data set is that point, whatever x_t.
        return objective.velocity(data.expand_as(x), x, t)

    out = euler_sample(velocity, noise, cond, cond, steps, cfg=1.0, shift=objective.shift)
    torch.testing.assert_close(out, data, rtol=1e-5, atol=1e-5)


def test_sampling_last_step_below_clamp_is_damped() -> None:
    # 50 steps: the last step starts at t = 0.02 < 0.05, so it moves only 0.02/0.05 = 40% of the
    # way to x̂0 (JiT's clamp applies at sampling as well). One Euler step from t = 0.02 to 0 with
    # x_t on the straight path: x = x_t − 0.02·(x_t − x0)/0.05 = 0.6·x_t + 0.4·x0.
    objective = _objective()
    data = torch.full((1, 1, 1, 1), 2.0)
    x_t = torch.full((1, 1, 1, 1), 1.0)
    v = objective.velocity(data, x_t, torch.tensor([0.02]))
    torch.testing.assert_close(x_t - 0.02 * v, torch.full((1, 1, 1, 1), 0.6 * 1.0 + 0.4 * 2.0))


def test_config_validation() -> None:
    assert XPredictionConfig().t_clamp == 0.05
    assert XPredictionConfig().shift == 1.0
    for bad in ({"t_clamp": 0.0}, {"t_clamp": 1.5}, {"shift": 0.0}, {"uniform_prob": 2.0}, {"t_min": 1.0}):
        with pytest.raises(ValueError):
            XPredictionConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="did you mean 't_clamp'"):
        bind(XPredictionConfig, {"t_clam": 0.1}, prefix="objective")


def test_info() -> None:
    assert INFO.name == "x_prediction"
    assert "2511.13720" in INFO.paper


def test_trainer_uses_x_prediction_and_publishes_x0(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r", {"objective": {"use": "x_prediction", "shift": 3.0}})
    trainer = make_trainer(recipe, tmp_path / "run")
    assert isinstance(trainer.run.objective, XPrediction)
    assert trainer.run.objective.shift == 3.0
    seen: list[torch.Tensor] = []
    original = trainer._loss_terms

    def spy(ctx: object) -> list:
        seen.append(ctx.stash[X0_PREDICTION])  # type: ignore[attr-defined]
        assert ctx.stash[X0_PREDICTION] is ctx.prediction_BCHW  # type: ignore[attr-defined]
        return original(ctx)  # type: ignore[arg-type]

    trainer._loss_terms = spy  # type: ignore[method-assign]
    losses = run_steps(trainer, 2)
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(losses)))
    images = trainer.generate(["a red circle"], steps=2, cfg=2.0, seed=0, size=16)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
