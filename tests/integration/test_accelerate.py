"""``accelerate launch`` as prx-run's launcher: one CPU process, a real tiny training run.

The trainer itself uses plain ``torch.distributed``; Accelerate is only the launcher here, so
what must hold is that a run started through it trains, checkpoints and exports like a plain one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prx_core.testing.fixtures import write_recipe

pytestmark = pytest.mark.integration

#: What ``accelerate config`` writes for "This machine, no distributed training, CPU only".
ONE_PROCESS_CPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: 'NO'
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
main_training_function: main
downcast_bf16: 'no'
"""


def test_accelerate_launch_trains_a_tiny_recipe(tmp_path: Path) -> None:
    config = tmp_path / "accelerate.yaml"
    config.write_text(ONE_PROCESS_CPU, encoding="utf-8")
    recipe = write_recipe(tmp_path, {"train": {"steps": 3, "checkpoint_every": 3}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.accelerate_cli",
            "launch",
            "--config_file",
            str(config),
            "-m",
            "prx_core.cli",
            str(recipe),
            "--run-dir",
            "run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "finished step 3" in result.stdout
    run = tmp_path / "run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in steps if "loss" in line]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)  # finite, NaN != NaN
    assert (run / "checkpoints" / "step_00000003").is_dir()
    assert json.loads((run / "run.json").read_text())["command"][-2:] == ["--run-dir", "run"]
