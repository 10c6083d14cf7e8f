"""bench/gpu_check.sh on a machine without CUDA stops at once with a clear message."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would really run")
def test_gpu_check_fails_fast_without_cuda(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 3, result.stderr
    assert "gpu_check:" in result.stderr and ("no NVIDIA GPU" in result.stderr or "no CUDA device" in result.stderr)
    assert "Nothing was run" in result.stderr or "nothing was run" in result.stderr
    assert elapsed < 30
    assert list(tmp_path.iterdir()) == []  # no step started, no result file written
