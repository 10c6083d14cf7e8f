"""Logged windows across a resume on several gloo ranks (``tests/integration/test_logged_windows_ranks.py``).

Importable for the same reason as :mod:`prx_core.testing.distributed_scenarios`: spawned workers
import their target by module name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prx_core.testing.distributed_scenarios import _run_scenario

#: Eight steps, a row every 4, a checkpoint at 6: mid-window.
PATCH = {
    "train": {"steps": 8, "log_every": 4, "checkpoint_every": 6, "keep_checkpoints": 3, "count_flops": False},
    "eval": {"at_end": False},
}


def window_scenarios(rank: int, world: int, port: int, workdir: str) -> None:
    _run_scenario(rank, world, port, Path(workdir) / f"result_{rank}.json", _window_body, "ddp")


def _rows(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{"step": row["step"], "loss": row["loss"]} for row in map(json.loads, lines) if "loss" in row]


def _window_body(rank: int, world: int, root: Path, strategy: str) -> dict[str, object]:
    import torch.distributed as dist

    from prx_core.testing.fixtures import make_trainer, tiny_recipe

    recipe_dir = root / f"recipe_rank{rank}"
    whole = make_trainer(tiny_recipe(recipe_dir, PATCH), root / "whole")
    whole.fit()
    del whole
    # A crash after the step-6 checkpoint: rank 0 drops what was written later, then all resume.
    if rank == 0:
        shutil.copytree(root / "whole", root / "crashed")
        shutil.rmtree(root / "crashed" / "checkpoints" / "step_00000008")
    dist.barrier()
    resumed = make_trainer(tiny_recipe(recipe_dir, PATCH), root / "crashed", resume="auto")
    out: dict[str, object] = {"resumed_at": resumed.step, "window_steps": resumed.log_window.steps}
    resumed.fit()
    if rank == 0:
        out["whole"] = _rows(root / "whole")
        out["resumed"] = _rows(root / "crashed")
    return out
