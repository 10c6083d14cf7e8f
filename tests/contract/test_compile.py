"""``train.compile = "blocks"``: regional compilation changes neither results nor parameter names.

The fast tests compile with dynamo's ``aot_eager`` backend (``PRX_COMPILE_BACKEND``): it traces
the same forward and backward graphs inductor would get, without the C++ code generation that
takes ~30 s per graph on a 2-core CPU. The inductor test is marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prx_core.denoiser import COMPILE_BACKEND_ENV
from prx_core.testing.fixtures import make_trainer, parameters_vector, run_steps, tiny_recipe


def _pair(
    tmp_path: Path, steps: int = 2, train: dict[str, object] | None = None
) -> tuple[list[float], list[float], object, object]:
    eager = make_trainer(tiny_recipe(tmp_path / "e", {"train": dict(train or {})}), tmp_path / "eager")
    patch = {"train": {**(train or {}), "compile": "blocks"}}
    compiled = make_trainer(tiny_recipe(tmp_path / "c", patch), tmp_path / "compiled")
    return run_steps(eager, steps), run_steps(compiled, steps), eager, compiled


def test_compiled_blocks_match_eager_and_keep_parameter_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    eager_losses, compiled_losses, eager, compiled = _pair(tmp_path)
    blocks = compiled.run.require("trainable").model.blocks  # type: ignore[attr-defined]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(block._compiled_call_impl is None for block in eager.run.require("trainable").model.blocks)  # type: ignore[attr-defined]
    # Checkpoints and exports see the same names as an eager run (no "_orig_mod." prefixes).
    names = list(compiled.run.require("trainable").state_dict())  # type: ignore[attr-defined]
    assert names == list(eager.run.require("trainable").state_dict())  # type: ignore[attr-defined]
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-7)
    assert torch.allclose(parameters_vector(compiled), parameters_vector(eager), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]
    assert compiled_losses[0] != compiled_losses[1]  # it did train


def test_compiled_blocks_under_activation_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpointed block loop calls the compiled block twice (forward, then recompute)."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    eager_losses, compiled_losses, eager, compiled = _pair(tmp_path, train={"activation_checkpointing": True})
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-7)
    assert torch.allclose(parameters_vector(compiled), parameters_vector(eager), rtol=1e-5, atol=1e-6)  # type: ignore[arg-type]


def test_compiled_run_fits_counts_flops_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole loop: FLOP counting at start (a dispatch mode around the compiled blocks), a
    checkpoint, and a resume with compile still on that continues like the uninterrupted run."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    patch = {"train": {"compile": "blocks", "steps": 3, "checkpoint_every": 2}, "eval": {"at_end": False}}
    straight = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    straight.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["tflops_per_s_per_device"] > 0 for x in lines)
    # Resume from step 2 in a copy of the run directory.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000003")
    resumed = make_trainer(tiny_recipe(tmp_path / "r", patch), resumed_dir, resume="auto")
    assert resumed.step == 2
    resumed.fit()
    assert torch.allclose(parameters_vector(resumed), parameters_vector(straight), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_blocks_match_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real backend (about 30 s on 2 cores: C++ code generation for forward and backward)."""
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "inductor")
    torch._dynamo.reset()
    eager_losses, compiled_losses, eager, compiled = _pair(tmp_path)
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-6)
    assert torch.allclose(parameters_vector(compiled), parameters_vector(eager), rtol=1e-4, atol=1e-5)  # type: ignore[arg-type]
