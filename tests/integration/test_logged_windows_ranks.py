"""On two gloo ranks, a resume from a mid-window checkpoint logs the rows of the uninterrupted run.

The checkpoint holds the window's sums as the mean over ranks, so the resumed row equals the
straight one up to float rounding (the two add the same numbers in another order); one process
is bitwise (tests/contract/test_logged_windows.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from prx_core.testing.distributed_scenarios import free_port
from prx_core.testing.window_scenarios import window_scenarios

pytestmark = pytest.mark.integration


def test_two_ranks_resume_mid_window_with_the_same_rows(tmp_path: Path) -> None:
    mp.spawn(window_scenarios, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result_{r}.json").read_text()) for r in range(2)]
    for r, result in enumerate(results):
        assert "error" not in result, f"rank {r}:\n{result['error']}"
        assert (result["resumed_at"], result["window_steps"]) == (6, 2)  # steps 5 and 6 restored
    whole, resumed = results[0]["whole"], results[0]["resumed"]
    assert [row["step"] for row in resumed] == [row["step"] for row in whole] == [4, 8]
    for straight, again in zip(whole, resumed, strict=True):
        assert again["loss"] == pytest.approx(straight["loss"], rel=1e-6, abs=0.0)
