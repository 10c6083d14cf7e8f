"""One writer per run directory: a second `prx-run` on a live run is refused, naming the holder;
a SIGTERM's save-and-exit releases the lock, and a lock left by a SIGKILL is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prx_core.runlock import LOCK_FILE
from prx_core.testing.fixtures import write_recipe

from .test_cli import prx_run

pytestmark = pytest.mark.integration


def _start(recipe: Path, cwd: Path, *extra: str) -> subprocess.Popen[str]:
    """A long `prx-run` in the background (it trains far more steps than the test lets it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "prx_core.cli", str(recipe), "--run-dir", "run", "--set", "train.steps=100000"]
    return subprocess.Popen(
        [*command, *extra], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_until_training(process: subprocess.Popen[str], run_dir: Path, timeout: float = 120.0) -> None:
    """Until ``process`` holds the lock and has logged a step since (so it handles SIGTERM)."""
    deadline = time.monotonic() + timeout
    lock, metrics = run_dir / LOCK_FILE, run_dir / "metrics.jsonl"
    logged_before: int | None = None

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    while logged_before is None or logged() <= logged_before:
        if logged_before is None and lock.exists() and f'"pid": {process.pid},' in lock.read_text():
            logged_before = logged()
        if process.poll() is not None:
            raise AssertionError(f"prx-run ended early ({process.returncode}):\n{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("prx-run logged no step in time")
        time.sleep(0.1)


def test_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"checkpoint_every": 100000, "log_every": 1}})
    run_dir = tmp_path / "run"

    first = _start(recipe, tmp_path)
    try:
        _wait_until_training(first, run_dir)
        holder = json.loads((run_dir / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid
        lines_before = (run_dir / "metrics.jsonl").read_text()
        second = prx_run(str(recipe), "--run-dir", "run", "--resume", "auto", cwd=tmp_path, check=False)
        assert second.returncode == 1
        refusal = second.stderr.strip().splitlines()[-1]
        assert refusal.startswith(f"prx-run: run directory run is in use by another prx-run (host {holder['host']}, ")
        assert f"pid {first.pid}, started " in refusal
        # The refused run wrote nothing: the live run's record only grew.
        assert (run_dir / "metrics.jsonl").read_text().startswith(lines_before)
        eval_refused = prx_run("eval", "run", cwd=tmp_path, check=False)
        assert eval_refused.returncode == 1 and f"pid {first.pid}" in eval_refused.stderr
        assert not (run_dir / "eval").exists()

        first.send_signal(signal.SIGTERM)  # save-and-exit releases the lock
        assert first.wait(timeout=60) == 0
        assert not (run_dir / LOCK_FILE).exists()
    finally:
        first.kill()
        first.communicate()

    killed = _start(recipe, tmp_path, "--resume", "auto")
    try:
        _wait_until_training(killed, run_dir)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
    finally:
        killed.kill()
        killed.communicate()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == killed.pid  # left behind

    after = prx_run(str(recipe), "--run-dir", "run", "--resume", "auto", "--set", "train.steps=3", cwd=tmp_path)
    assert f"taking over the lock of a prx-run that is gone (host {holder['host']}, pid {killed.pid}" in after.stderr
    assert "finished step 3" in after.stdout
    assert not (run_dir / LOCK_FILE).exists()
