"""A launcher restart: under ``torchrun --max-restarts=1``, rank 1 fails once at step 5 of 6.

The restarted group (``--resume auto``, the same command) must take over the run lock the first
group left, reload the newest checkpoint (step 4) on every rank, and end with the weights of an
uninterrupted 2-rank run, tensor for tensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prx_core.runlock import LOCK_FILE
from prx_core.testing.fixtures import write_recipe

pytestmark = pytest.mark.integration

#: An outside plugin, found through PYTHONPATH by its entry point: rank 1 raises once, after the
#: optimizer step ``CRASH_AT_STEP``, when ``CRASH_MARKER`` does not exist yet (it creates it).
#: Every rank appends "<launcher attempt> <step>" per step to steps-rank<r>.txt.
PLUGIN = """
import os
from dataclasses import dataclass
from pathlib import Path

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class Config:
    pass


INFO = PluginInfo(name="crash_once", summary="test plugin: rank 1 fails once", config=Config)


@hookimpl
def prx_after_optimizer_step(run, step):
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    with open(run.run_dir / f"steps-rank{run.rank}.txt", "a") as record:
        record.write(f"{attempt} {step}\\n")
    marker = os.environ.get("CRASH_MARKER")
    if marker and run.rank == 1 and step == int(os.environ["CRASH_AT_STEP"]) and not Path(marker).exists():
        Path(marker).touch()
        raise RuntimeError("injected failure of rank 1")
"""


def _plugin_site(root: Path) -> Path:
    site = root / "site"
    (site / "prx_crash_once").mkdir(parents=True)
    (site / "prx_crash_once" / "__init__.py").write_text(PLUGIN)
    info = site / "prx_crash_once-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prx-crash-once\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[prx]\ncrash_once = prx_crash_once\n")
    return site


def _torchrun(recipe: Path, run_dir: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1"),
        *("-m", "prx_core.cli", str(recipe), "--run-dir", run_dir, "--resume", "auto", "--quiet"),
    ]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)


def _steps(run_dir: Path, rank: int) -> list[tuple[int, int]]:
    lines = (run_dir / f"steps-rank{rank}.txt").read_text().split("\n")
    return [(int(a), int(s)) for a, s in (line.split() for line in lines if line)]


def test_a_rank_failing_once_is_restarted_from_the_newest_checkpoint(tmp_path: Path) -> None:
    site = _plugin_site(tmp_path)
    recipe = write_recipe(tmp_path, {"train": {"steps": 6, "checkpoint_every": 2}, "plugins": {"crash_once": {}}})
    pythonpath = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    marker = tmp_path / "crashed"

    restarted = _torchrun(
        recipe,
        "restarted",
        tmp_path,
        {"PYTHONPATH": pythonpath, "CRASH_MARKER": str(marker), "CRASH_AT_STEP": "5"},
    )
    (tmp_path / "restarted.log").write_text(restarted.stderr)  # the launcher's account, for a failure
    assert restarted.returncode == 0, restarted.stderr[-4000:]
    assert marker.exists() and "injected failure of rank 1" in restarted.stderr

    # First attempt: steps 1..5 on both ranks (rank 1 failed after its 5th). Restart: from the
    # step-4 checkpoint, so every rank's next step is 5.
    run_dir = tmp_path / "restarted"
    for rank in (0, 1):
        steps = _steps(run_dir, rank)
        first = [s for a, s in steps if a == 0]
        assert first[:4] == [1, 2, 3, 4] and first[-1] <= 5
        assert [s for a, s in steps if a == 1] == [5, 6], f"rank {rank}: {steps}"
    assert not (run_dir / LOCK_FILE).exists()

    straight = _torchrun(recipe, "straight", tmp_path, {"PYTHONPATH": pythonpath})
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert [a for a, _ in _steps(tmp_path / "straight", 1)] == [0] * 6  # never restarted

    final = Path("checkpoints") / "step_00000006" / "trainable.safetensors"
    expected, got = load_file(tmp_path / "straight" / final), load_file(run_dir / final)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
