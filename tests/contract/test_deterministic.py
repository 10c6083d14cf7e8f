"""``train.deterministic`` turns on PyTorch's deterministic algorithms before the run is built."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    # The switch is process-wide: leave the other tests' process as it was.
    before, workspace = torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(before)
    if workspace is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_deterministic_run_trains_and_resumes_without_drift(tmp_path: Path, restore_determinism: None) -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    recipe = tiny_recipe(tmp_path / "r", {"train": {"deterministic": True}})
    trainer = make_trainer(recipe, tmp_path / "run")
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert all(math.isfinite(x) for x in run_steps(trainer, 2))
    trainer.save()
    # Switching it off for the resume is not drift: the maths is the same, only the kernels differ.
    plain = tiny_recipe(tmp_path / "r2", {"train": {"deterministic": False}})
    assert make_trainer(plain, tmp_path / "run", resume="auto").step == 2
