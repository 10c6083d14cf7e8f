"""Muon inside the trainer: group learning rates, and the bf16_weights policy with fp32 state."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from prx_core.testing.fixtures import make_trainer, parameters_vector, run_steps, tiny_recipe  # noqa: E402


def test_bf16_weights_with_muon_trains_resumes_and_keeps_fp32_state(tmp_path: Path) -> None:
    patch = {"optimizer": {"use": "muon", "lr": 1e-3}, "precision": {"use": "bf16_weights"}}
    first = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    assert first.run.precision.warning
    losses = run_steps(first, 1)
    trainable = first.run.require("trainable")
    assert {p.dtype for p in trainable.parameters()} == {torch.bfloat16}
    state_dtypes = {v.dtype for s in first.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)}
    assert state_dtypes == {torch.float32}
    assert first._group_learning_rates().keys() == {"lr/muon", "lr/adamw"}
    first.save()
    expected = run_steps(first, 1)
    second = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run", resume="auto")  # guard runs here
    assert run_steps(second, 1) == expected
    assert torch.equal(parameters_vector(second), parameters_vector(first))
    assert all(map(torch.isfinite, map(torch.tensor, losses + expected)))
