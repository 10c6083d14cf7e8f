"""The run directory: everything needed to understand and reproduce a run.

Layout::

    <run_dir>/recipe.toml       resolved recipe (every default filled in, [requires] filled from the
                                plugins used; `prx-run` re-runs it)
    <run_dir>/run.json          plugins and versions, recipe sources and their sha256, git SHA,
                                environment, command, overrides
    <run_dir>/train.log         the log
    <run_dir>/metrics.jsonl     one JSON object per logged step
    <run_dir>/samples/          sample grids (PNG) and their prompts
    <run_dir>/checkpoints/      full-state checkpoints (see prx_core.checkpoint)
    <run_dir>/final/transformer the trained denoiser as a diffusers folder
    <run_dir>/prx.lock          while a process writes the run: its host, pid, start, heartbeat
                                (see prx_core.runlock)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from prx_core import __version__
from prx_core.recipe import Recipe, dump_toml

RECIPE_FILE = "recipe.toml"
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def git_sha(start: Path | None = None) -> str | None:
    """The commit of the source tree prx runs from (and whether it has local changes)."""
    where = start or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_count": os.cpu_count(),
        "prx_core": __version__,
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_run_files(run_dir: Path, recipe: Recipe, command: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"Resolved recipe of run '{recipe.name}', written by prx {__version__}."
    if recipe.source is not None:
        header += f"\nSource: {recipe.source}"
    if recipe.overrides:
        header += "\nOverrides: " + " ".join(recipe.overrides)
    write_atomic(run_dir / RECIPE_FILE, dump_toml(recipe.shared(), header=header))
    info = {
        "name": recipe.name,
        "source": str(recipe.source) if recipe.source else None,
        "overrides": recipe.overrides,
        # Each file the recipe was read from (the recipe first, then its parents) and its sha256:
        # a resume checks them (prx_core.trainer), prx-run diff compares the resolved recipes.
        "recipe_sources": recipe.sources,
        "command": command,
        "plugins": recipe.active.versions_table(),
        "slots": {slot: {"use": c.use, "plugin": c.plugin} for slot, c in recipe.slots.items()},
        "git_sha": git_sha(),
        "environment": environment(),
    }
    write_atomic(run_dir / RUN_INFO_FILE, json.dumps(info, indent=2) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines written after the checkpoint, so the record has no duplicates."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    write_atomic(path, "".join(f"{line}\n" for line in kept))
