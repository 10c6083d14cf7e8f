"""A full disk during a checkpoint save (ENOSPC, injected by a failing writer).

The documented behaviour (README, "Checkpoints"): the failed save removes its partial copy, the
previous checkpoint stays the newest valid one, training continues and the next save retries;
when the *last* save of a run fails, the run stops with an error naming the newest valid checkpoint.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import IO, Any

import pytest

import prx_core.checkpoint as ckpt
from prx_core.errors import TrainingError
from prx_core.testing.fixtures import make_trainer, tiny_recipe

pytestmark = pytest.mark.integration


class _DiskFullWriter:
    """A file that accepts ``budget`` bytes, then fails like a full disk."""

    def __init__(self, path: Path, budget: int) -> None:
        self._handle = path.open("wb")
        self._left = budget

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._left:
            raise OSError(errno.ENOSPC, "No space left on device", str(self._handle.name))
        self._left -= size
        return self._handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, step: int, budget: int = 4096) -> None:
    real_open = ckpt._open_for_write
    state = {"left": budget}

    def open_for_write(path: Path) -> IO[bytes]:
        if f"step_{step:08d}" not in path.parent.name:
            return real_open(path)
        writer = _DiskFullWriter(path, state["left"])
        state["left"] = 0  # the disk stays full for the rest of this save
        return writer  # type: ignore[return-value]

    monkeypatch.setattr(ckpt, "_open_for_write", open_for_write)


def _run_dir_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_a_failed_save_keeps_the_previous_checkpoint_and_training_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fill_disk_at(monkeypatch, step=4)
    recipe = tiny_recipe(tmp_path / "r", {"train": {"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3}})
    trainer = make_trainer(recipe, tmp_path / "run")
    with caplog.at_level(logging.ERROR, logger="prx"):
        result = trainer.fit()
    assert result.step == 6 and not result.stopped_early  # training went on past the failed save
    assert trainer.failed_saves == 1
    assert any("No space left on device" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records)
    # No partial copy is left behind; steps 2 and 6 are committed and verify.
    assert _run_dir_entries(tmp_path / "run") == ["step_00000002", "step_00000006"]
    manager = ckpt.CheckpointManager(tmp_path / "run" / "checkpoints")
    assert all(manager.verify(info) is None for info in manager.committed())
    resumed = make_trainer(recipe, tmp_path / "run", resume="auto")
    assert resumed.step == 6


def test_when_the_last_save_fails_the_run_stops_naming_the_valid_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill_disk_at(monkeypatch, step=4)
    recipe = tiny_recipe(tmp_path / "r", {"train": {"steps": 4, "checkpoint_every": 2}})
    trainer = make_trainer(recipe, tmp_path / "run")
    with pytest.raises(TrainingError, match=r"last checkpoint could not be written.*No space left.*step 2"):
        trainer.fit()
    assert _run_dir_entries(tmp_path / "run") == ["step_00000002"]
    monkeypatch.undo()  # space was freed
    resumed = make_trainer(recipe, tmp_path / "run", resume="auto")
    assert resumed.step == 2
    assert resumed.fit().step == 4
    assert _run_dir_entries(tmp_path / "run") == ["step_00000002", "step_00000004"]
