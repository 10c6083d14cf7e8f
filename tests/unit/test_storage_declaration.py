"""Declared storage dtypes: the one sanctioned way for a plugin to keep a trainable module of its
own in another dtype than the policy's ``param_dtype`` (REPA's bf16 projector, reference.md §8),
and the precision guard that checks declared modules against their declaration."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from prx_core.context import RunContext
from prx_core.precision import (
    Bf16Mixed,
    Bf16Weights,
    Fp32,
    PrecisionError,
    StorageDeclaration,
    declare_storage_dtype,
    declared_storage,
)
from prx_core.testing.fixtures import tiny_recipe

CPU = torch.device("cpu")


def _trainable() -> torch.nn.Module:
    """A model and two plugin modules, named as in ``TrainableModules`` (model.*, extras.<name>.*)."""
    torch.manual_seed(0)
    extras = torch.nn.ModuleDict(
        {"repa": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU()), "other": torch.nn.Linear(4, 2)}
    )
    root = torch.nn.Module()
    root.model = torch.nn.Linear(4, 4)
    root.extras = extras
    return root


def test_a_declared_module_is_cast_marked_and_accepted() -> None:
    modules = _trainable()
    declaration = declare_storage_dtype(modules.extras["repa"], torch.bfloat16, owner="repa", reason="as the reference")
    assert declaration == StorageDeclaration(dtype=torch.bfloat16, owner="repa", reason="as the reference")
    assert {p.dtype for p in modules.extras["repa"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in modules.model.parameters()} == {torch.float32}  # nothing else is touched
    assert declared_storage(modules) == {"extras.repa": declaration}
    Bf16Mixed(CPU).check(modules, None, "at start")
    Fp32().check(modules, None, "at start")


def test_the_guard_refuses_a_declared_module_in_any_other_dtype() -> None:
    modules = _trainable()
    declare_storage_dtype(modules.extras["repa"], torch.bfloat16, owner="repa", reason="as the reference")
    modules.extras["repa"].float()  # cast back after the declaration
    with pytest.raises(
        PrecisionError,
        match=r"after resume: parameter 'extras\.repa\.0\.weight' is torch\.float32 but plugin 'repa' declared "
        r"module 'extras\.repa' stored in torch\.bfloat16 \(as the reference\)",
    ):
        Bf16Mixed(CPU).check(modules, None, "after resume")


def test_undeclared_modules_are_still_checked_against_param_dtype() -> None:
    modules = _trainable()
    declare_storage_dtype(modules.extras["repa"], torch.bfloat16, owner="repa", reason="as the reference")
    modules.extras["other"].to(torch.bfloat16)  # not declared: the silent bf16 bug the guard exists for
    with pytest.raises(PrecisionError, match=r"parameter 'extras\.other\.weight' is torch\.bfloat16 .*'bf16_mixed'"):
        Bf16Mixed(CPU).check(modules, None, "at start")
    # A module whose name merely starts like the declared one is not covered by it.
    modules = _trainable()
    modules.extras["repa_head"] = torch.nn.Linear(2, 2).to(torch.bfloat16)
    declare_storage_dtype(modules.extras["repa"], torch.bfloat16, owner="repa", reason="as the reference")
    with pytest.raises(PrecisionError, match=r"parameter 'extras\.repa_head\.weight'"):
        Bf16Mixed(CPU).check(modules, None, "at start")


def test_gradients_follow_the_declaration() -> None:
    modules = _trainable()
    declare_storage_dtype(modules.extras["repa"], torch.bfloat16, owner="repa", reason="as the reference")
    weight = modules.extras["repa"][0].weight
    weight.grad = torch.zeros_like(weight)  # bf16, like the weight: fine
    Bf16Mixed(CPU).check(modules, None, "at start")
    if hasattr(weight, "grad_dtype"):
        weight.grad_dtype = None  # torch >= 2.10 refuses a mismatched grad otherwise
    weight.grad = torch.zeros(weight.shape, dtype=torch.float32)
    with pytest.raises(
        PrecisionError, match=r"gradient of 'extras\.repa\.0\.weight' is torch\.float32, expected torch\.bfloat16"
    ):
        Bf16Mixed(CPU).check(modules, None, "at start")


def test_optimizer_state_stays_state_dtype_for_declared_modules() -> None:
    modules = _trainable()
    declare_storage_dtype(modules.extras["repa"], torch.bfloat16, owner="repa", reason="as the reference")
    # torch's AdamW would keep bf16 moments for the bf16 projector: refused, declared or not.
    with pytest.raises(
        PrecisionError, match=r"optimizer AdamW would keep the state of 'extras\.repa\.0\.weight' in torch\.bfloat16"
    ):
        Bf16Mixed(CPU).check(modules, torch.optim.AdamW(modules.parameters()), "at start")
    from prx_core.optim import StateDtypeAdamW

    Bf16Mixed(CPU).check(modules, StateDtypeAdamW(modules.parameters(), state_dtype=torch.float32), "at start")


def test_the_innermost_declaration_wins_and_declarations_need_a_reason() -> None:
    modules = _trainable()
    declare_storage_dtype(modules.extras, torch.bfloat16, owner="outer", reason="outer")
    declare_storage_dtype(modules.extras["other"], torch.float64, owner="inner", reason="inner")
    Bf16Mixed(CPU).check(modules, None, "at start")
    assert {p.dtype for p in modules.extras["repa"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in modules.extras["other"].parameters()} == {torch.float64}
    with pytest.raises(ValueError, match="needs the declaring plugin's name and a reason"):
        declare_storage_dtype(torch.nn.Linear(1, 1), torch.bfloat16, owner="x", reason=" ")
    with pytest.raises(ValueError, match="floating-point"):
        declare_storage_dtype(torch.nn.Linear(1, 1), torch.int8, owner="x", reason="no")


def test_run_store_weights_in_declares_and_logs_only_a_real_exception(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = RunContext(recipe=tiny_recipe(tmp_path), device=CPU, run_dir=tmp_path / "run")
    run.precision = Bf16Mixed(CPU)
    projector = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.INFO, logger="prx"):
        run.store_weights_in(projector, torch.bfloat16, owner="repa", reason="as the reference")
    assert projector.weight.dtype == torch.bfloat16
    assert declared_storage(projector) == {"": StorageDeclaration(torch.bfloat16, "repa", "as the reference")}
    assert "plugin 'repa' stores its module's weights in torch.bfloat16, not in torch.float32" in caplog.text
    # Under bf16_weights bf16 *is* param_dtype: no exception to declare, nothing logged.
    run.precision = Bf16Weights(CPU)
    same = torch.nn.Linear(4, 4).to(torch.bfloat16)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="prx"):
        run.store_weights_in(same, torch.bfloat16, owner="repa", reason="as the reference")
    assert declared_storage(same) == {} and "stores its module's weights" not in caplog.text
