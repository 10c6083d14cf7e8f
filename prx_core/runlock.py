"""One writer per run directory: the exclusive lock ``<run_dir>/prx.lock``.

Rank 0 of every ``prx-run`` that writes into a run directory (training, ``--resume``, the
stages of a staged recipe, ``eval``, ``sample``, ``export``) takes the lock before it writes
anything; a second process on a locked directory is refused with a one-line error naming the
holder. The lock file is created with ``O_CREAT | O_EXCL``, which is atomic on local disks and
on NFS v3+/Lustre/GPFS alike (``fcntl`` locks are not reliable across the nodes of a cluster).

The file records the holder's host, pid, start time and a heartbeat that a background thread
refreshes (atomically: write a temporary file, then rename it over the lock). A lock is stale,
and taken over with a WARNING, when its holder runs on this host and its pid is gone (a
SIGKILL, an out-of-memory kill), or when its heartbeat is older than ``PRX_LOCK_STALE_S``
seconds (default 300: a holder on another node that died with it). Two processes that find
the same stale lock serialise on ``prx.lock.takeover`` (also ``O_EXCL``), so one takes it.

The lock is released at the end of ``Trainer.fit``, when ``prx-run`` leaves (normally, after
a SIGTERM's save-and-exit, or on an error), and at interpreter exit. A process may open the
same directory several times (the stages of a run, tests): the lock is counted per process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prx_core.errors import TrainingError

if TYPE_CHECKING:
    from prx_core.distributed import DistEnv

logger = logging.getLogger("prx")

LOCK_FILE = "prx.lock"
#: Environment variable: seconds without a heartbeat after which a lock counts as abandoned.
STALE_ENV = "PRX_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0
#: A takeover guard older than this was left by a process that died mid-takeover.
TAKEOVER_GUARD_STALE_S = 30.0


class RunLockedError(TrainingError):
    """The run directory is held by another live process."""


def stale_after_s() -> float:
    """``PRX_LOCK_STALE_S`` (seconds, > 0), else the default."""
    text = os.environ.get(STALE_ENV)
    if text is None or text.strip() == "":
        return DEFAULT_STALE_S
    try:
        value = float(text)
    except ValueError:
        raise TrainingError(f"{STALE_ENV}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise TrainingError(f"{STALE_ENV} must be > 0 seconds, got {text!r}")
    return value


def heartbeat_interval_s(stale_s: float) -> float:
    """A fifth of the stale timeout (several missed beats before a takeover), at most 30 s."""
    return max(0.05, min(30.0, stale_s / 5))


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the process holding it."""

    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    command: str = ""

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The lock file's holder; None when there is no lock file. A file that cannot be parsed
        (a holder killed while creating it) counts as a holder with no heartbeat at all."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            return cls(
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=float(data["started"]),
                heartbeat=float(data["heartbeat"]),
                token=str(data["token"]),
                command=str(data.get("command", "")),
            )
        except (ValueError, KeyError, TypeError):
            mtime = _mtime(path)
            return cls(host="?", pid=-1, started=mtime, heartbeat=mtime, token=f"unreadable-{mtime}")

    def as_json(self) -> str:
        return json.dumps(
            {
                "host": self.host,
                "pid": self.pid,
                "started": self.started,
                "started_utc": _utc(self.started),
                "heartbeat": self.heartbeat,
                "token": self.token,
                "command": self.command,
            },
            indent=2,
        )

    def describe(self, now: float | None = None) -> str:
        age = (now if now is not None else time.time()) - self.heartbeat
        return (
            f"host {self.host}, pid {self.pid}, started {_utc(self.started)}, last heartbeat {max(age, 0.0):.0f} s ago"
        )

    def stale_reason(self, stale_s: float, now: float | None = None) -> str | None:
        """Why this holder is gone (None while it may be alive)."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        age = (now if now is not None else time.time()) - self.heartbeat
        if age > stale_s:
            return f"its heartbeat is {age:.0f} s old (> {STALE_ENV}={stale_s:g})"
        return None


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text``; False if it already exists (atomic on shared filesystems)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return True


class RunLock:
    """This process's hold on one run directory's lock (see the module docstring)."""

    def __init__(self, run_dir: Path, holder: Holder, stale_s: float) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.holder = holder
        self.stale_s = stale_s
        self.count = 0
        # A beat must never recreate the file after its removal: both run under this mutex.
        self._mutex = threading.Lock()
        self._removed = False

    def beat(self) -> None:
        """Refresh the heartbeat, unless the file is no longer ours (then say so, once)."""
        with self._mutex:
            if not self._removed:
                self._beat()

    def _beat(self) -> None:
        current = Holder.read(self.path)
        if current is None and not self.run_dir.exists():  # the directory was deleted (a test's temp dir)
            _forget(self)
            return
        if current is None or current.token != self.holder.token:
            logger.error(
                "run lock %s was removed or taken over by another process (%s); this run no longer holds it",
                self.path,
                current.describe() if current else "no lock file",
            )
            _forget(self)
            return
        self.holder = replace(self.holder, heartbeat=time.time())
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.holder.token}.tmp")
        tmp.write_text(self.holder.as_json(), encoding="utf-8")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        if os.getpid() != self.holder.pid:  # a forked child exiting must not free its parent's lock
            return
        with self._mutex:
            self._removed = True
            current = Holder.read(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)


class LockHandle:
    """One opening of a locked run directory; :meth:`release` is idempotent."""

    def __init__(self, lock: RunLock) -> None:
        self._lock: RunLock | None = lock

    @property
    def path(self) -> Path | None:
        return self._lock.path if self._lock else None

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        with _STATE_LOCK:
            lock.count -= 1
            if lock.count > 0 or _HELD.get(_key(lock.run_dir)) is not lock:
                return
            del _HELD[_key(lock.run_dir)]
        lock.remove()


_HELD: dict[str, RunLock] = {}
_STATE_LOCK = threading.Lock()
_HEARTBEAT: threading.Thread | None = None
#: Set when a lock is taken, so the heartbeat thread re-reads its interval at once.
_WAKE = threading.Event()


def _key(run_dir: Path) -> str:
    return str(run_dir.resolve())


def _forget(lock: RunLock) -> None:
    with _STATE_LOCK:
        if _HELD.get(_key(lock.run_dir)) is lock:
            del _HELD[_key(lock.run_dir)]


def _heartbeat_loop() -> None:
    while True:
        with _STATE_LOCK:
            interval = min((heartbeat_interval_s(lock.stale_s) for lock in _HELD.values()), default=1.0)
        _WAKE.wait(interval)
        _WAKE.clear()
        with _STATE_LOCK:
            locks = list(_HELD.values())
        for lock in locks:
            try:
                lock.beat()
            except OSError as err:  # a full disk or a flaky mount: the next beat retries
                logger.warning("run lock %s: heartbeat not written (%s)", lock.path, err)


def _start_heartbeat() -> None:
    global _HEARTBEAT
    if _HEARTBEAT is None or not _HEARTBEAT.is_alive():
        _HEARTBEAT = threading.Thread(target=_heartbeat_loop, name="prx-run-lock-heartbeat", daemon=True)
        _HEARTBEAT.start()


def release_all() -> None:
    """Release every lock this process holds (``prx-run`` on its way out; registered at exit)."""
    with _STATE_LOCK:
        locks = list(_HELD.values())
        _HELD.clear()
    for lock in locks:
        try:
            lock.remove()
        except OSError as err:
            logger.warning("run lock %s could not be removed: %s", lock.path, err)


atexit.register(release_all)


def acquire(run_dir: Path, command: str = "") -> LockHandle:
    """Take ``run_dir``'s lock (creating the directory), or raise :class:`RunLockedError`."""
    stale_s = stale_after_s()
    with _STATE_LOCK:
        held = _HELD.get(_key(run_dir))
        if held is not None:
            held.count += 1
            return LockHandle(held)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    now = time.time()
    mine = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex, command)
    if not _create_exclusive(path, mine.as_json()):
        _take_over(path, mine, stale_s)
    lock = RunLock(run_dir, mine, stale_s)
    with _STATE_LOCK:
        lock.count = 1
        _HELD[_key(run_dir)] = lock
    _start_heartbeat()
    _WAKE.set()
    return LockHandle(lock)


def _refusal(run_dir: Path, holder: Holder) -> RunLockedError:
    return RunLockedError(
        f"run directory {run_dir} is in use by another prx-run ({holder.describe()}); wait for it to end or "
        f"stop it, or pass --run-dir to use another directory (a lock whose holder died is taken over once "
        f"its process is gone from this host or its heartbeat is older than {STALE_ENV} seconds)"
    )


def _take_over(path: Path, mine: Holder, stale_s: float) -> None:
    """Replace a stale lock at ``path`` by ``mine``, or raise :class:`RunLockedError`."""
    holder = Holder.read(path)
    if holder is not None:
        reason = holder.stale_reason(stale_s)
        if reason is None:
            raise _refusal(path.parent, holder)
    guard = path.with_name(f"{LOCK_FILE}.takeover")
    if not _create_exclusive(guard, mine.as_json()):
        if time.time() - _mtime(guard) <= TAKEOVER_GUARD_STALE_S:
            raise RunLockedError(f"run directory {path.parent}: another process is taking over its stale lock now")
        guard.unlink(missing_ok=True)  # left by a process that died mid-takeover
        if not _create_exclusive(guard, mine.as_json()):
            raise RunLockedError(f"run directory {path.parent}: another process is taking over its stale lock now")
    try:
        current = Holder.read(path)
        if current is not None:
            if holder is None or current.token != holder.token:  # taken while we looked
                raise _refusal(path.parent, current)
            path.unlink(missing_ok=True)
            logger.warning(
                "run directory %s: taking over the lock of a prx-run that is gone (%s; %s)",
                path.parent,
                holder.describe(),
                reason,
            )
        if not _create_exclusive(path, mine.as_json()):
            current = Holder.read(path)
            raise _refusal(path.parent, current) if current else RunLockedError(f"cannot create {path}")
    finally:
        guard.unlink(missing_ok=True)


def live_holder(run_dir: Path) -> Holder | None:
    """The holder of ``run_dir``'s lock when it is live (not stale, not this process), else None."""
    holder = Holder.read(run_dir / LOCK_FILE)
    if holder is None or holder.stale_reason(stale_after_s()) is not None:
        return None
    if holder.host == socket.gethostname() and holder.pid == os.getpid():
        return None
    return holder


def acquire_on_rank0(run_dir: Path, dist: DistEnv, command: str = "") -> LockHandle | None:
    """:func:`acquire` on rank 0; every rank learns the outcome, so on a refusal all of them raise
    :class:`RunLockedError` (a collective when ``dist`` is active). Other ranks get None."""
    handle: LockHandle | None = None
    refusal: list[Any] = [None]
    if dist.is_main:
        try:
            handle = acquire(run_dir, command)
        except TrainingError as err:
            refusal = [str(err)]
    if dist.active:
        import torch.distributed

        torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise RunLockedError(refusal[0])
    return handle
