"""Precision policies: the dtype guard in both directions, the bf16_weights ablation, and how
much of an lr-1e-4 update bf16-stored weights actually keep (the visibility test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prx_core.precision import BF16_WEIGHTS_WARNING, Bf16Mixed, Bf16Weights, Fp32, PrecisionError
from prx_core.testing.fixtures import tiny_recipe
from prx_core.trainer import Trainer

CPU = torch.device("cpu")


def _module(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2)).to(dtype)


class _StateDtypeOptimizer(torch.optim.SGD):
    """Stands for an optimizer that honours precision.state_dtype (declares it)."""

    state_dtype = torch.float32


def test_policies_dtypes_and_warnings() -> None:
    mixed, fp32, bf16w = Bf16Mixed(CPU), Fp32(), Bf16Weights(CPU)
    assert (mixed.param_dtype, mixed.state_dtype, mixed.warning) == (torch.float32, torch.float32, None)
    assert (fp32.param_dtype, fp32.frozen_dtype, fp32.warning) == (torch.float32, torch.float32, None)
    assert (bf16w.param_dtype, bf16w.frozen_dtype, bf16w.state_dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert bf16w.warning == BF16_WEIGHTS_WARNING and "bf16_mixed" in BF16_WEIGHTS_WARNING
    with bf16w.autocast(CPU):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with Bf16Weights(CPU, autocast=False).autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")


def test_guard_trips_on_accidental_bf16_under_bf16_mixed_naming_the_parameter() -> None:
    module = _module()
    module[2].to(torch.bfloat16)
    with pytest.raises(PrecisionError, match=r"at start: parameter '2\.weight' is torch\.bfloat16 .*'bf16_mixed'"):
        Bf16Mixed(CPU).check(module, None, "at start")
    with pytest.raises(PrecisionError, match=r"parameter '2\.weight' is torch\.bfloat16 .*'fp32'"):
        Fp32().check(module, None, "after resume")


def test_guard_trips_on_bf16_gradient_under_bf16_mixed() -> None:
    module = _module()
    if hasattr(module[0].weight, "grad_dtype"):
        module[0].weight.grad_dtype = None  # torch >= 2.10 refuses a mismatched grad otherwise
    module[0].weight.grad = torch.zeros(8, 4, dtype=torch.bfloat16)
    with pytest.raises(PrecisionError, match=r"gradient of '0\.weight' is torch\.bfloat16"):
        Bf16Mixed(CPU).check(module, None, "at start")


def test_guard_trips_on_fp32_weights_under_bf16_weights() -> None:
    # The reference bug (reference.md §7.1): bf16 weights were asked for but the model stayed fp32.
    with pytest.raises(
        PrecisionError, match=r"parameter '0\.weight' is torch\.float32 .*'bf16_weights'.*recipe failed this way"
    ):
        Bf16Weights(CPU).check(_module(), None, "at start")
    module = _module(torch.bfloat16)
    module[1].float()
    with pytest.raises(PrecisionError, match=r"parameter '1\.weight' is torch\.float32"):
        Bf16Weights(CPU).check(module, None, "at start")
    Bf16Weights(CPU).check(_module(torch.bfloat16), None, "at start")  # all bf16: fine


def test_guard_trips_on_bf16_optimizer_state() -> None:
    # torch AdamW on bf16 weights keeps bf16 moments: refused under bf16_weights (promises fp32 state)...
    module = _module(torch.bfloat16)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(
        PrecisionError, match=r"after resume: optimizer state 'exp_avg' of '0\.weight' is torch\.bfloat16"
    ):
        Bf16Weights(CPU).check(module, optimizer, "after resume")
    # ... and under bf16_mixed, where a resumed fp32 model somehow got bf16 moments.
    fp32_module = _module()
    adamw = torch.optim.AdamW(fp32_module.parameters(), lr=1e-3)
    for p in fp32_module.parameters():
        p.grad = torch.ones_like(p)
    adamw.step()
    next(iter(adamw.state.values()))["exp_avg_sq"] = torch.zeros(8, 4, dtype=torch.bfloat16)
    with pytest.raises(PrecisionError, match=r"optimizer state 'exp_avg_sq' of '0\.weight' is torch\.bfloat16"):
        Bf16Mixed(CPU).check(fp32_module, adamw, "after resume")


def test_guard_predicts_state_dtype_before_the_first_step() -> None:
    # At start there is no state yet; torch optimizers will create it in the weight dtype (bf16),
    # so bf16_weights refuses them at start rather than after the first resume.
    module = _module(torch.bfloat16)
    with pytest.raises(
        PrecisionError, match=r"at start: optimizer AdamW would keep the state of '0\.weight' in torch\.bfloat16"
    ):
        Bf16Weights(CPU).check(module, torch.optim.AdamW(module.parameters()), "at start")
    Bf16Weights(CPU).check(module, _StateDtypeOptimizer(module.parameters(), lr=0.1), "at start")
    # bf16_mixed with fp32 weights: torch AdamW's state will be fp32, fine.
    fp32_module = _module()
    Bf16Mixed(CPU).check(fp32_module, torch.optim.AdamW(fp32_module.parameters()), "at start")


def test_bf16_weights_in_the_trainer_builds_bf16_with_fp32_adamw_state(tmp_path: Path) -> None:
    # The weights reach bf16 (otherwise the guard would name a float32 parameter), and the builtin
    # AdamW keeps fp32 moments for them (the guard would refuse bf16 ones at start).
    recipe = tiny_recipe(tmp_path, {"precision": {"use": "bf16_weights"}})
    trainer = Trainer(recipe, tmp_path / "run")
    trainer.setup()
    assert all(p.dtype == torch.bfloat16 for p in trainer.run.require("trainable").parameters())
    assert type(trainer.optimizer).__name__ == "StateDtypeAdamW"
    assert trainer.optimizer.state_dtype == torch.float32


# --------------------------------------------------------------------------- visibility

LR = 1e-4


def changed_fraction(weights: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of weights stored in ``dtype`` whose stored value changes when ``delta`` is added."""
    stored = weights.to(dtype)
    after = stored.clone()
    after.add_(delta)  # computed in fp32, rounded once into the storage dtype
    return (after != stored).double().mean().item()


def visibility_table() -> dict[str, tuple[float, float]]:
    """{case: (fraction changed in bf16, fraction changed in fp32)} for one AdamW-like step at lr 1e-4.

    AdamW's first step moves every weight by exactly lr·sign(g) (m̂/√v̂ = ±1); later steps are
    smaller, typically an RMS of about 0.2·lr (also Muon's update RMS with the 0.2·√max(m,n) scale).
    """
    generator = torch.Generator().manual_seed(0)
    n = 200_000
    linear = torch.randn(n, generator=generator) * 0.02  # transformer linear init
    norm = 1.0 + torch.randn(n, generator=generator) * 0.02  # norm / modulation scales
    sign = torch.randn(n, generator=generator).sign()
    table = {}
    for weights_name, weights in (("linear N(0,0.02)", linear), ("norm ~1.0", norm)):
        for size_name, size in (("lr", LR), ("0.2·lr", 0.2 * LR)):
            delta = -size * sign
            table[f"{weights_name}, |Δ|={size_name}"] = (
                changed_fraction(weights, delta, torch.bfloat16),
                changed_fraction(weights, delta, torch.float32),
            )
    return table


def test_visibility_bf16_weights_mostly_ignore_lr_1e4_updates() -> None:
    table = visibility_table()
    report = "; ".join(f"{case}: bf16 {b:.1%} changed, fp32 {f:.1%}" for case, (b, f) in table.items())
    assert all(f == 1.0 for _, f in table.values()), report
    # Norm and modulation scales (~1.0): bf16 spacing there is 2^-7, so nothing moves at all.
    assert table["norm ~1.0, |Δ|=lr"][0] < 0.10, report
    assert table["norm ~1.0, |Δ|=0.2·lr"][0] < 0.10, report
    # Linear weights: the first AdamW step (|Δ| = lr) still moves most of them (88% for
    # N(0, 0.02)), but a typical later step (0.2·lr) is lost on most of them.
    assert table["linear N(0,0.02), |Δ|=0.2·lr"][0] < 0.5, report
    overall = sum(b for b, _ in table.values()) / len(table)
    assert overall < 0.5, report


def _step_inputs(tmp_path: Path, policy: str, weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """x0, noise, t, x_t, the target and the text states of micro-step 0 under ``policy``."""
    from prx_core.testing.fixtures import make_trainer

    recipe = tiny_recipe(tmp_path / policy, {"precision": {"use": policy}})
    trainer = make_trainer(recipe, tmp_path / f"run-{policy}")
    if weights is not None:
        trainer.run.require("trainable").load_state_dict(weights)
    seen: dict[str, torch.Tensor] = {}
    objective = trainer.run.require("objective")
    real_loss = objective.loss

    def loss(step, prediction):
        seen.update(
            x0=step.x0_BCHW,
            noise=step.noise_BCHW,
            t=step.t_B,
            x_t=step.x_t_BCHW,
            text=step.text_BLD,
            target=step.noise_BCHW - step.x0_BCHW,
            prediction=prediction,
        )
        return real_loss(step, prediction)

    objective.loss = loss
    trainer.micro_step(0, 0)
    return seen


def test_bf16_weights_changes_weight_storage_only(tmp_path: Path) -> None:
    """Under ``bf16_weights`` the step's data (x0, ε, t, x_t, the velocity target, the text
    states) is bit for bit what ``bf16_mixed`` computes from the same bf16-representable weights,
    all in fp32; only the stored weights (and what they compute) differ."""
    bf16 = _step_inputs(tmp_path, "bf16_weights", None)
    from prx_core.testing.fixtures import make_trainer

    bf16_trainer = make_trainer(tiny_recipe(tmp_path / "w", {"precision": {"use": "bf16_weights"}}), tmp_path / "w-run")
    same_weights = {k: v.float() for k, v in bf16_trainer.run.require("trainable").state_dict().items()}
    mixed = _step_inputs(tmp_path, "bf16_mixed", same_weights)
    for name in ("x0", "noise", "t", "x_t", "target", "text"):
        assert bf16[name].dtype == torch.float32, f"{name} is {bf16[name].dtype} under bf16_weights"
        assert torch.equal(bf16[name], mixed[name]), f"{name} differs between bf16_weights and bf16_mixed"
    # x_t written out: (1 − t)·x0 + t·ε in fp32, with t not rounded to bf16 first.
    t = bf16["t"].reshape(-1, 1, 1, 1)
    assert torch.equal(bf16["x_t"], (1 - t) * bf16["x0"] + t * bf16["noise"])


def test_bf16_weights_without_autocast_still_runs_on_fp32_data(tmp_path: Path) -> None:
    inputs = _step_inputs(tmp_path, "bf16_weights", None)
    assert inputs["x_t"].dtype == torch.float32
    recipe = tiny_recipe(tmp_path / "no-autocast", {"precision": {"use": "bf16_weights", "autocast": False}})
    from prx_core.testing.fixtures import make_trainer, run_steps

    trainer = make_trainer(recipe, tmp_path / "run-no-autocast")
    assert all(torch.isfinite(torch.tensor(run_steps(trainer, 1))))
