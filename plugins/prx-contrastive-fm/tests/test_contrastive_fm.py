"""Unit tests for ``contrastive_fm`` against an independent per-sample loop."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prx_contrastive_fm import INFO, TERM, ContrastiveFMConfig, prx_loss_terms
from prx_contrastive_fm.loss import contrastive_mse

from prx_core.config import RecipeError, bind
from prx_core.flow import interpolate
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe


class Identity:
    """A velocity objective: the model output is the velocity."""

    def velocity(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return prediction


class FromX0:
    """An x-prediction objective with the clamp written out independently: v = (x_t − x̂0)/max(t, 0.05)."""

    t_clamp = 0.05  # public, as the x_prediction objective exposes it

    def velocity(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x_t)
        for i in range(x_t.shape[0]):
            out[i] = (x_t[i] - prediction[i]) / max(float(t[i]), 0.05)
        return out


def _loop_reference(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> float:
    """Plain Python loop: sample i against the target of sample i − 1 (0 against B − 1)."""
    batch = v_pred.shape[0]
    total, count = 0.0, 0
    for i in range(batch):
        j = (i - 1) % batch
        for a, n, x in zip(
            v_pred[i].flatten().tolist(), noise[j].flatten().tolist(), x0[j].flatten().tolist(), strict=True
        ):
            total += (a - (n - x)) ** 2
            count += 1
    return total / count


def _loop_reference_x_prediction(
    v_pred: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clamp: float = 0.05
) -> float:
    """Sample i against sample i − 1's own x-prediction target (x_t − x0)/max(t, clamp), element by element."""
    batch = v_pred.shape[0]
    total, count = 0.0, 0
    for i in range(batch):
        j = (i - 1) % batch
        scale = max(float(t[j]), clamp)
        for a, xt, x in zip(
            v_pred[i].flatten().tolist(), x_t[j].flatten().tolist(), x0[j].flatten().tolist(), strict=True
        ):
            total += (a - (xt - x) / scale) ** 2
            count += 1
    return total / count


def _tensors(batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, 3, 3, generator=g)
    noise = torch.randn(batch, 2, 3, 3, generator=g)
    t = torch.rand(batch, generator=g)
    t[0] = 0.01  # one sample inside the x-prediction clamp
    pred = torch.randn(batch, 2, 3, 3, generator=g)
    return x0, noise, t, interpolate(x0, noise, t), pred


def test_hand_values_batch_of_two() -> None:
    # One element per sample. Targets ε − x0: sample 0 -> 1 − 0 = 1, sample 1 -> 0 − 2 = −2.
    x0 = torch.tensor([0.0, 2.0]).reshape(2, 1, 1, 1)
    noise = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1)
    pred = torch.tensor([3.0, 5.0]).reshape(2, 1, 1, 1)
    t = torch.tensor([0.5, 0.5])
    value = contrastive_mse(Identity(), pred, x0, noise, interpolate(x0, noise, t), t)
    # pred 0 vs target 1 (−2): (3 + 2)² = 25 ; pred 1 vs target 0 (1): (5 − 1)² = 16 ; mean 20.5
    assert value is not None
    torch.testing.assert_close(value, torch.tensor(20.5))


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_matches_loop_for_velocity_objective(batch: int) -> None:
    x0, noise, t, x_t, pred = _tensors(batch)
    value = contrastive_mse(Identity(), pred, x0, noise, x_t, t)
    assert value is not None and value.shape == ()
    assert value.item() == pytest.approx(_loop_reference(pred, x0, noise), rel=1e-5)


def test_matches_loop_for_x_prediction_objective() -> None:
    x0, noise, t, x_t, pred = _tensors(4, seed=1)  # sample 0 has t = 0.01, inside the clamp
    value = contrastive_mse(FromX0(), pred, x0, noise, x_t, t)
    assert value is not None
    v_pred = FromX0().velocity(pred, x_t, t)
    assert value.item() == pytest.approx(_loop_reference_x_prediction(v_pred, x0, x_t, t), rel=1e-5)
    # Not ε − x0 for the neighbour inside the clamp (sample 1 is paired with sample 0).
    assert abs(value.item() - _loop_reference(v_pred, x0, noise)) > 1e-3


def test_x_prediction_rolled_target_below_the_clamp_hand_values() -> None:
    """reference.md §8: under x-prediction the rolled target is the neighbour's own (x_t − x0)/max(t, 0.05).

    One element per sample. Sample 0: x0 = 0, ε = 1, t = 0.01, so x_t = 0.01 and its target is
    (0.01 − 0)/0.05 = 0.2 (ε − x0 would be 1). Sample 1: x0 = 2, ε = 0, t = 0.5, so x_t = 1 and
    its target is (1 − 2)/0.5 = −2. Predictions x̂0 = 0.5 and 1 give v̂ = (0.01 − 0.5)/0.05 = −9.8
    and (1 − 1)/0.5 = 0. Rolled pairs: v̂_0 against target_1, (−9.8 + 2)² = 60.84; v̂_1 against
    target_0, (0 − 0.2)² = 0.04. Mean 30.44 (ε − x0 for sample 0 would give (0 − 1)² = 1, mean 30.92).
    """
    x0 = torch.tensor([0.0, 2.0]).reshape(2, 1, 1, 1)
    noise = torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1)
    t = torch.tensor([0.01, 0.5])
    x_t = torch.tensor([0.01, 1.0]).reshape(2, 1, 1, 1)
    x0_hat = torch.tensor([0.5, 1.0]).reshape(2, 1, 1, 1)
    value = contrastive_mse(FromX0(), x0_hat, x0, noise, x_t, t)
    assert value is not None
    assert value.item() == pytest.approx(30.44, rel=1e-5)


def test_x_prediction_objective_in_the_trainer_uses_its_clamp(tmp_path: Path) -> None:
    """With the real ``x_prediction`` objective (its public ``t_clamp``), the logged term is the MSE
    against the neighbours' clamped targets, checked by the element loop on the step's tensors."""
    recipe = tiny_recipe(
        tmp_path / "r", {"objective": {"use": "x_prediction"}, "plugins": {"contrastive_fm": {"weight": 0.5}}}
    )
    trainer = make_trainer(recipe, tmp_path / "run")
    objective = trainer.run.require("objective")
    assert objective.t_clamp == 0.05
    seen: dict[str, torch.Tensor] = {}
    real_loss = objective.loss

    def spy(step, prediction):  # type: ignore[no-untyped-def]
        # The step's t with one sample forced below the clamp, so the rolled target must differ from ε − x0.
        step.t_B = step.t_B.clone()
        step.t_B[0] = 0.02
        step.x_t_BCHW = interpolate(step.x0_BCHW, step.noise_BCHW, step.t_B)
        seen.update(x0=step.x0_BCHW, t=step.t_B, x_t=step.x_t_BCHW, prediction=prediction.detach().float())
        return real_loss(step, prediction)

    objective.loss = spy
    _, terms = trainer.micro_step(0, 0)
    v_pred = FromX0().velocity(seen["prediction"], seen["x_t"], seen["t"])
    expected = _loop_reference_x_prediction(v_pred, seen["x0"], seen["x_t"], seen["t"])
    assert terms["contrastive_fm"].item() == pytest.approx(expected, rel=1e-5)


def test_batch_of_one_is_skipped() -> None:
    x0, noise, t, x_t, pred = _tensors(1)
    assert contrastive_mse(Identity(), pred, x0, noise, x_t, t) is None


def test_fp32_value_and_gradient_only_through_prediction() -> None:
    x0, noise, t, x_t, pred = _tensors(3)
    pred_bf16 = pred.to(torch.bfloat16).requires_grad_(True)
    value = contrastive_mse(Identity(), pred_bf16, x0, noise, x_t, t)
    assert value is not None and value.dtype == torch.float32
    value.backward()
    assert pred_bf16.grad is not None and pred_bf16.grad.abs().sum() > 0


def _step(batch: int, weight: float = 0.05) -> SimpleNamespace:
    x0, noise, t, x_t, pred = _tensors(batch)
    run = SimpleNamespace(
        plugin_config=lambda name: ContrastiveFMConfig(weight=weight),
        require=lambda what: Identity(),
    )
    return SimpleNamespace(run=run, prediction_BCHW=pred, x0_BCHW=x0, noise_BCHW=noise, x_t_BCHW=x_t, t_B=t)


def test_hook_returns_negative_weighted_term() -> None:
    step = _step(3, weight=0.2)
    terms = prx_loss_terms(step)  # type: ignore[arg-type]
    assert terms is not None and len(terms) == 1
    (term,) = terms
    assert term.name == TERM == "contrastive_fm"
    assert term.weight == -0.2
    assert term.value.item() == pytest.approx(
        _loop_reference(step.prediction_BCHW, step.x0_BCHW, step.noise_BCHW), rel=1e-5
    )


def test_hook_skips_batch_of_one() -> None:
    assert prx_loss_terms(_step(1)) is None  # type: ignore[arg-type]


def test_config() -> None:
    assert ContrastiveFMConfig().weight == 0.05
    with pytest.raises(ValueError, match="weight"):
        ContrastiveFMConfig(weight=-0.1)
    with pytest.raises(RecipeError, match="did you mean 'weight'"):
        bind(ContrastiveFMConfig, {"weigth": 0.1}, prefix="plugins.contrastive_fm")
    assert INFO.config is ContrastiveFMConfig and "2506.05350" in INFO.paper


def test_trainer_total_is_objective_minus_lambda_term(tmp_path: Path) -> None:
    plain = make_trainer(tiny_recipe(tmp_path / "a"), tmp_path / "run_a")
    with_term = make_trainer(
        tiny_recipe(tmp_path / "b", {"plugins": {"contrastive_fm": {"weight": 0.5}}}), tmp_path / "run_b"
    )
    base = run_steps(plain, 1)[0]
    loss, terms, _ = with_term.train_step(0)
    assert set(terms) == {"contrastive_fm"}
    assert terms["contrastive_fm"].item() > 0
    assert loss.item() == pytest.approx(base - 0.5 * terms["contrastive_fm"].item(), abs=1e-5)


def test_trainer_with_batch_of_one_has_no_term(tmp_path: Path) -> None:
    trainer = make_trainer(
        tiny_recipe(tmp_path / "r", {"train": {"global_batch": 1}, "plugins": {"contrastive_fm": {}}}), tmp_path / "run"
    )
    _, terms, _ = trainer.train_step(0)
    assert terms == {}
