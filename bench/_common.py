"""What every benchmark here shares: interleaved timing, and the header lines (date, commit, hardware).

Run benchmarks as scripts (``python bench/<name>.py``); Python puts ``bench/`` on the path, so they
import this module as ``_common``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(name: str) -> Callable[[], float]:
    """``wall`` (perf_counter) or ``process`` (this process's CPU time: on a shared CPU with one
    thread it counts only our own work, not time spent descheduled; meaningless for CUDA)."""
    return time.perf_counter if name == "wall" else time.process_time


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    warmup: int,
    rounds: int,
    clock_name: str = "wall",
    on_warm: Callable[[str], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """(median, best) milliseconds per call of each candidate.

    Candidates take turns, one call each per round, so a noisy neighbour on a shared machine
    slows all of them alike instead of whichever happened to run at that moment. ``on_warm(label)``
    runs after a candidate's warm-up (e.g. to read its peak memory).
    """
    now = clock(clock_name)
    for label, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        synchronize(device)
        if on_warm is not None:
            on_warm(label)
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            start = now()
            step()
            synchronize(device)
            times[label].append((now() - start) * 1e3)
    return {label: (statistics.median(values), min(values)) for label, values in times.items()}


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {torch.get_num_threads()} torch threads, {os.cpu_count()} logical CPUs"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def header(device: torch.device) -> list[str]:
    """The date, commit, hardware and torch lines every benchmark prints first."""
    return [
        f"date     : {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"commit   : {commit()}",
        f"hardware : {hardware(device)}",
        f"torch    : {torch.__version__}",
    ]
