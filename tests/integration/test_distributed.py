"""Two gloo ranks on CPU: DDP and FSDP2 train, agree, and resume bitwise.

One launch per strategy runs several scenarios (``torch.multiprocessing`` inside pytest), because
process start-up dominates on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from prx_core.testing.distributed_scenarios import free_port, resume_scenarios

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_train_in_sync_and_resume_bitwise(strategy: str, tmp_path: Path) -> None:
    mp.spawn(resume_scenarios, args=(2, free_port(), str(tmp_path), strategy), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result_{strategy}_{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
        assert result["params_agree_across_ranks"]
        assert result["resumed_at"] == 2
        # 2 + resume + 2 == 4 straight, bitwise: losses and weights.
        assert result["resumed_losses"][-2:] == result["straight_losses"][2:]
        assert result["resumed_params"] == result["straight_params"]
        # The negative control must break equality, or the comparison above proves nothing.
        assert result["control_losses"] != result["straight_losses"][2:]
        assert result["stopped_early"] and result["stopped_at"] == 2 and result["checkpoints"] == [2]
    assert results[0]["first_sample"] != results[1]["first_sample"]  # ranks read different samples
    assert results[0]["grad_norm"] == results[1]["grad_norm"]
    assert results[0]["straight_params"], "rank 0 must see the full weights"


def test_torchrun_launch_of_prx_run(tmp_path: Path) -> None:
    """The real launcher: `torchrun --nproc_per_node 2 -m prx_core.cli RECIPE` trains with gloo DDP."""
    from prx_core.testing.fixtures import write_recipe

    from .test_cli import prx_run

    recipe = write_recipe(tmp_path, {"train": {"steps": 2, "checkpoint_every": 2}})
    result = prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path, nproc=2)
    assert result.stdout.count("finished step 2") == 1  # rank 0 reports, rank 1 stays quiet
    assert "2 process(es) (ddp)" in result.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_00000002"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2]  # plus the end-of-run evaluation line


def test_sigterm_to_the_torchrun_launcher_saves_a_committed_checkpoint(tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers: they agree, save at a step boundary and exit."""
    import subprocess
    import sys
    import time

    from prx_core.checkpoint import CheckpointManager
    from prx_core.testing.fixtures import write_recipe

    recipe = write_recipe(tmp_path, {"train": {"steps": 100_000, "checkpoint_every": 100_000}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "prx_core.cli",
            str(recipe),
            "--run-dir",
            "run",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    launcher.communicate(timeout=120)  # torchrun itself reports the signal; the workers exit cleanly
    committed = CheckpointManager(tmp_path / "run" / "checkpoints").committed()
    assert len(committed) == 1 and committed[0].step >= 3
    assert "stop requested: saving step" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_muon_trains_resumes_bitwise_and_compiles_on_two_ranks(strategy: str, tmp_path: Path) -> None:
    """Muon through the trainer under DDP and FSDP2 (reference.md §7.7), with regional compile after wrapping."""
    pytest.importorskip("prx_muon")
    from prx_core.testing.distributed_scenarios import muon_scenarios

    mp.spawn(muon_scenarios, args=(2, free_port(), str(tmp_path), strategy), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"muon_{strategy}_{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
        assert result["optimizer"] == "MuonAdamW" and min(result["groups"]) > 0
        assert result["resumed_at"] == 2
        assert result["resumed_losses"] == result["straight_losses"][2:]
        assert result["resumed_params"] == result["straight_params"]
        assert result["blocks_compiled"]
        assert result["compiled_losses"] == pytest.approx(result["straight_losses"], rel=1e-5, abs=1e-7)
        assert result["compiled_params"] == pytest.approx(result["straight_params"], rel=1e-5, abs=1e-6)
    assert results[0]["straight_params"], "rank 0 must see the full weights"
    assert results[0]["straight_losses"] != results[1]["straight_losses"]  # ranks trained on different data
