"""``prx-run check --memory``: the memory estimate of every CUDA recipe, and a refusal when it does not fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def check(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "prx_core.cli", "check", "--memory", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_check_memory_prints_the_estimate_and_refuses_a_recipe_that_does_not_fit() -> None:
    fits = check("recipes/pixel_1024.toml")
    assert fits.returncode == 0, fits.stderr
    assert "memory " in fits.stdout and "GiB per GPU (batch 16 × 2 accumulation" in fits.stdout
    # The recipe's old default: 32 images per GPU without activation checkpointing (~112 GiB).
    too_big = check("recipes/pixel_1024.toml", "--set", "train.micro_batch=32")
    assert too_big.returncode == 1
    assert "exceeds 80 GB" in too_big.stderr and "activation_checkpointing" in too_big.stderr
    # A smaller card, the same recipe: the limit is the flag's.
    assert check("recipes/baseline.toml", "--gpu-gb", "40").returncode == 1
