"""A resumed run logs the same metrics.jsonl as the run without the interruption, row for row.

The rows average the loss over ``log_every`` steps. A checkpoint in the middle of a window holds
the window's sums, so the first row after a resume is the mean over the whole window (steps
5–8 below), not only over the steps trained since the resume (7–8).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from prx_core.testing.fixtures import make_trainer, tiny_recipe
from prx_core.trainer import MetricWindow, Trainer

#: Twelve steps, a row every 4 (steps 4, 8, 12), checkpoints at 6 and 12: mid-window.
PATCH = {
    "train": {"steps": 12, "log_every": 4, "checkpoint_every": 6, "keep_checkpoints": 3, "count_flops": False},
    "eval": {"at_end": False},
    "plugins": {"ema": {"decay": 0.9, "every": 1}},  # a loss-free plugin, so rows differ only by the losses
}
#: Keys that measure this machine or this process, not the run.
TIMINGS = {
    "time",
    "steps_per_s",
    "images_per_s",
    "batches_per_s",
    "data_wait_fraction",
    "peak_mem_gb",
    "peak_mem_reserved_gb",
    "tflops_per_s_per_device",
    "mfu",
    # Counts the prompts this process's text encoder cut, and a resumed process starts with a cold
    # text cache, so it encodes (and counts) again prompts the uninterrupted one had cached.
    "text/truncated_prompts",
}


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows if "loss" in row]


def _uninterrupted(tmp_path: Path) -> tuple[Path, list[float]]:
    """The 12-step run, recording each step's loss to compute the rows by hand."""
    run_dir = tmp_path / "whole"
    trainer = make_trainer(tiny_recipe(tmp_path / "recipe", PATCH), run_dir)
    losses: list[float] = []
    real_step = trainer.train_step

    def recording_step(step: int) -> Any:
        out = real_step(step)
        losses.append(out[0].item())
        return out

    setattr(trainer, "train_step", recording_step)  # noqa: B010 (an instance attribute shadows the method)
    trainer.fit()
    return run_dir, losses


def _stop_after(trainer: Trainer, step: int) -> None:
    """Ask ``fit`` to stop after ``step`` (what SIGTERM does): it saves that step and returns."""
    real_step = trainer.train_step

    def step_then_stop(current: int) -> Any:
        out = real_step(current)
        trainer.stop_requested = current + 1 >= step
        return out

    setattr(trainer, "train_step", step_then_stop)  # noqa: B010 (an instance attribute shadows the method)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    return _uninterrupted(tmp_path_factory.mktemp("windows"))


def test_rows_are_window_means(whole: tuple[Path, list[float]]) -> None:
    run_dir, losses = whole
    rows = _rows(run_dir)
    assert [row["step"] for row in rows] == [4, 8, 12]
    for row in rows:
        window = losses[row["step"] - 4 : row["step"]]
        assert row["loss"] == pytest.approx(sum(window) / 4, rel=1e-6)


def test_a_stop_mid_window_then_resume_logs_the_same_rows(whole: tuple[Path, list[float]], tmp_path: Path) -> None:
    recipe_dir = tmp_path / "recipe"
    run_dir = tmp_path / "stopped"
    first = make_trainer(tiny_recipe(recipe_dir, PATCH), run_dir)
    _stop_after(first, 7)  # not a multiple of log_every (4) nor of checkpoint_every (6)
    result = first.fit()
    assert result.stopped_early and result.step == 7
    assert first.checkpoints.committed()[-1].step == 7
    del first
    resumed = make_trainer(tiny_recipe(recipe_dir, PATCH), run_dir, resume="auto")
    assert resumed.step == 7 and resumed.log_window.steps == 3  # steps 5, 6 and 7
    resumed.fit()
    assert _rows(run_dir) == _rows(whole[0])


def test_a_crash_after_a_mid_window_checkpoint_resumes_the_same_rows(
    whole: tuple[Path, list[float]], tmp_path: Path
) -> None:
    # The run died after its step-6 checkpoint: drop what it wrote later, then resume.
    run_dir = tmp_path / "crashed"
    shutil.copytree(whole[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    resumed = make_trainer(tiny_recipe(tmp_path / "recipe", PATCH), run_dir, resume="auto")
    assert resumed.step == 6 and resumed.log_window.steps == 2  # steps 5 and 6
    assert [row["step"] for row in _rows(run_dir)] == [4]  # rows past the checkpoint are dropped
    resumed.fit()
    assert _rows(run_dir) == _rows(whole[0])


def test_window_state_round_trips_bitwise() -> None:
    import torch

    window = MetricWindow()
    for value in (1.1, 2.2, 3.3):
        window.add(torch.tensor(value), {"repa": torch.tensor(value / 3)})
    restored = MetricWindow()
    restored.load_state_dict(json.loads(json.dumps(window.state_dict(None))))
    assert restored.steps == 3
    assert torch.equal(restored.loss_sum, window.loss_sum)
    assert torch.equal(restored.term_sums["repa"], window.term_sums["repa"])


def test_a_version_1_checkpoint_resumes_with_an_empty_window(tmp_path: Path) -> None:
    """Payload version 1 had no window: its converter gives an empty one (the first row after the
    resume then averages the steps trained since, as version 1 did)."""
    from prx_core.recipe import load

    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).parents[1] / "fixtures" / "checkpoint_v1", run_dir)
    trainer = make_trainer(load(run_dir / "recipe.toml"), run_dir, resume="auto")
    assert trainer.step == 4
    assert trainer.log_window.state_dict(None) == {"steps": 0, "loss_sum": 0.0, "term_sums": {}}
