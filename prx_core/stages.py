"""Running a recipe with ``[[stages]]``: one trainer per stage, each continuing the previous one.

Layout: ``RUN_DIR/stages/<k>-<name>/`` is an ordinary run directory per stage (its own resolved
recipe, checkpoints, metrics and samples, global step numbers continuing across stages), and
``RUN_DIR/stages.json`` says which stage is where. A stage is finished when its newest committed
checkpoint is at its last step; ``--resume auto`` re-enters the first unfinished stage, resuming it
from its own checkpoints or, if it has none yet, starting it from the previous stage's last one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from prx_core import runlock
from prx_core.checkpoint import CheckpointInfo, CheckpointManager
from prx_core.errors import TrainingError
from prx_core.recipe import Recipe, Stage
from prx_core.rundir import write_atomic
from prx_core.trainer import FitResult, Trainer

logger = logging.getLogger("prx.stages")

STAGES_FILE = "stages.json"


@dataclass
class StagedResult:
    fit: FitResult
    stage_dir: Path
    trainer: Trainer


def stage_dir(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "stages" / stage.dir_name


def _last_checkpoint(directory: Path) -> CheckpointInfo | None:
    checkpoints = directory / "checkpoints"
    return CheckpointManager(checkpoints).latest_valid() if checkpoints.is_dir() else None


def _write_index(run_dir: Path, recipe: Recipe, current: int) -> None:
    # Rank 0 writes, as it writes everything in the run directory; the process group does not exist
    # yet between stages (each trainer joins it), so the launcher's RANK says who that is.
    if int(os.environ.get("RANK", "0")) != 0:
        return
    entries = [
        {
            "index": s.index,
            "name": s.name,
            "first_step": s.first_step,
            "last_step": s.last_step,
            "dir": str(stage_dir(run_dir, s).relative_to(run_dir)),
            "state": "done" if s.index < current else ("running" if s.index == current else "pending"),
        }
        for s in recipe.stages
    ]
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / STAGES_FILE, json.dumps({"recipe": recipe.name, "stages": entries}, indent=2) + "\n")


def run_stages(
    recipe: Recipe,
    run_dir: Path,
    resume: str | None,
    allow_drift: bool,
    command: list[str],
) -> StagedResult:
    """Train every stage in order; returns the last stage's result (or the one that stopped early)."""
    if resume not in (None, "auto"):
        raise TrainingError("a staged recipe resumes with --resume auto (it picks the stage itself)")
    if resume is None and (run_dir / "stages").exists() and any((run_dir / "stages").iterdir()):
        raise TrainingError(
            f"run directory {run_dir} already holds stages; pass --resume auto to continue it, or --run-dir to "
            "start a new run"
        )
    # Rank 0 locks the whole run directory before writing stages.json (each stage's trainer then
    # takes the same lock again, collectively, so every rank learns of a refusal).
    run_lock = runlock.acquire(run_dir, " ".join(command)) if int(os.environ.get("RANK", "0")) == 0 else None
    previous: CheckpointInfo | None = None
    result: StagedResult | None = None
    for stage in recipe.stages:
        directory = stage_dir(run_dir, stage)
        newest = _last_checkpoint(directory)
        if newest is not None and newest.step >= stage.last_step:
            logger.info("stage %d '%s' already finished (step %d)", stage.index + 1, stage.name, newest.step)
            previous = newest
            continue
        if stage.index > 0 and previous is None:
            raise TrainingError(
                f"stage {stage.index + 1} '{stage.name}' needs the previous stage's last checkpoint, and none is "
                f"committed in {stage_dir(run_dir, recipe.stages[stage.index - 1])}"
            )
        _write_index(run_dir, recipe, stage.index)
        logger.info(
            "stage %d/%d '%s': steps %d..%d in %s",
            stage.index + 1,
            len(recipe.stages),
            stage.name,
            stage.first_step + 1,
            stage.last_step,
            directory,
        )
        continue_from = (previous, stage.first_step) if previous is not None and newest is None else None
        trainer = Trainer(
            stage.recipe,
            directory,
            resume="auto" if newest is not None else None,
            allow_drift=allow_drift,
            command=command,
            continue_from=continue_from,
        )
        trainer.lock_dir = run_dir
        trainer.setup()
        fit = trainer.fit()
        result = StagedResult(fit, directory, trainer)
        if fit.stopped_early:
            if run_lock is not None:
                run_lock.release()
            return result
        previous = _last_checkpoint(directory)
    _write_index(run_dir, recipe, len(recipe.stages))
    if run_lock is not None:
        run_lock.release()
    if result is None:
        raise TrainingError(f"every stage of {run_dir} is already finished")
    return result
