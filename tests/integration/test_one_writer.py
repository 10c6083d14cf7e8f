"""One writer per run directory: a second `prx-run` (training or eval) on a live run is refused,
naming the holder; a lock left by a SIGKILL is taken over by the next start, and released when
that run ends."""

from __future__ import annotations

import json
import os
import signal
import socket
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
    # Output to a file: a pipe nobody reads would fill up and stall the run.
    with (cwd / f"background-{time.monotonic_ns()}.log").open("w") as log:
        return subprocess.Popen([*command, *extra], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


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
            raise AssertionError(f"prx-run ended early ({process.returncode}), see the background-*.log files")
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

        first.send_signal(signal.SIGKILL)  # no chance to release the lock
        first.wait(timeout=30)
    finally:
        first.kill()
        first.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid  # left behind

    after = prx_run(str(recipe), "--run-dir", "run", "--resume", "auto", "--set", "train.steps=3", cwd=tmp_path)
    assert f"taking over the lock of a prx-run that is gone (host {holder['host']}, pid {first.pid}" in after.stderr
    assert "finished step 3" in after.stdout
    assert not (run_dir / LOCK_FILE).exists()


def test_ablate_leaves_a_run_directory_in_use_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prx_core.commands import ablate

    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, {"name": "busy"}, name="busy.toml")
    run_dir = tmp_path / "runs" / "busy" / "seed0"
    run_dir.mkdir(parents=True)
    # No checkpoint yet: without the lock, ablate would set these metrics aside as a dead attempt's.
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.time()
        record = {"host": socket.gethostname(), "pid": holder.pid, "started": now, "heartbeat": now, "token": "t"}
        (run_dir / LOCK_FILE).write_text(json.dumps(record))
        code = ablate.main([str(recipe), "--runs-root", "runs"])
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out
    assert code == 1 and f"busy/seed0  FAILED (run directory in use by {socket.gethostname()} pid {holder.pid})" in out
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (run_dir / "recipe.toml").exists()  # no run was started
