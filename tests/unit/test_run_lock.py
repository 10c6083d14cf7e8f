"""The run-directory lock: taken, refused while its holder lives, taken over once it is gone."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prx_core import runlock
from prx_core.errors import TrainingError
from prx_core.runlock import LOCK_FILE, RunLockedError, acquire, live_holder


def _write_lock(run_dir: Path, *, host: str, pid: int, heartbeat: float, started: float = 1_700_000_000.0) -> None:
    """A lock file as another process would have left it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "pid": pid, "started": started, "heartbeat": heartbeat, "token": "theirs"}
    (run_dir / LOCK_FILE).write_text(json.dumps(record), encoding="utf-8")


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process on this host that stays alive for the test."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def test_acquire_records_the_holder_and_release_removes_the_file(tmp_path: Path) -> None:
    before = time.time()
    handle = acquire(tmp_path / "run", command="prx-run r.toml")
    record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    assert before <= record["started"] <= time.time() and record["command"] == "prx-run r.toml"
    handle.release()
    handle.release()  # idempotent
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_live_holder_is_refused_by_name(tmp_path: Path, live_pid: int) -> None:
    # 2023-11-14 22:13:20 UTC is the epoch second 1_700_000_000.
    _write_lock(tmp_path, host=socket.gethostname(), pid=live_pid, heartbeat=time.time())
    with pytest.raises(RunLockedError) as refused:
        acquire(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"host {socket.gethostname()}, pid {live_pid}, started 2023-11-14 22:13:20 UTC" in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # untouched
    holder = live_holder(tmp_path)
    assert holder is not None and holder.pid == live_pid


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = _dead_pid()
    _write_lock(tmp_path, host=socket.gethostname(), pid=pid, heartbeat=time.time())
    assert live_holder(tmp_path) is None
    with caplog.at_level(logging.WARNING, logger="prx"):
        handle = acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("taking over" in w and f"pid {pid}" in w and "is gone" in w for w in warnings)
    handle.release()


def test_another_hosts_lock_is_stale_only_past_the_heartbeat_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRX_LOCK_STALE_S", "60")
    # Another node: its pid cannot be checked, only its heartbeat.
    _write_lock(tmp_path, host="node-elsewhere", pid=1, heartbeat=time.time() - 30)
    with pytest.raises(RunLockedError, match="host node-elsewhere, pid 1"):
        acquire(tmp_path)
    _write_lock(tmp_path, host="node-elsewhere", pid=1, heartbeat=time.time() - 61)
    handle = acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()
    handle.release()


def test_the_heartbeat_advances_while_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRX_LOCK_STALE_S", "0.5")  # a beat every 0.1 s
    handle = acquire(tmp_path)
    first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
    deadline = time.time() + 5
    while json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] > first
    handle.release()
    assert not (tmp_path / LOCK_FILE).exists()
    time.sleep(0.3)  # no beat recreates a released lock
    assert not (tmp_path / LOCK_FILE).exists()


def test_one_process_may_open_a_directory_twice(tmp_path: Path) -> None:
    outer, inner = acquire(tmp_path), acquire(tmp_path)
    inner.release()
    assert (tmp_path / LOCK_FILE).exists()  # still held by the outer opening
    outer.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_release_leaves_a_lock_that_another_process_took(tmp_path: Path) -> None:
    handle = acquire(tmp_path)
    _write_lock(tmp_path, host="node-elsewhere", pid=7, heartbeat=time.time())
    handle.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"


def test_a_takeover_in_progress_elsewhere_is_refused(tmp_path: Path) -> None:
    _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), heartbeat=time.time())
    (tmp_path / f"{LOCK_FILE}.takeover").write_text("{}")
    with pytest.raises(RunLockedError, match="taking over"):
        acquire(tmp_path)
    old = time.time() - runlock.TAKEOVER_GUARD_STALE_S - 5
    os.utime(tmp_path / f"{LOCK_FILE}.takeover", (old, old))  # its taker died
    acquire(tmp_path).release()
    assert not (tmp_path / f"{LOCK_FILE}.takeover").exists()


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_timeout_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PRX_LOCK_STALE_S", value)
    with pytest.raises(TrainingError, match="PRX_LOCK_STALE_S"):
        acquire(tmp_path)
