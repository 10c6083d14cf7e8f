from __future__ import annotations

import math

import pytest

from prx_core.schedules import lr_multiplier


def test_warmup_then_constant_is_the_prx_baseline() -> None:
    # 1000-step warm-up: step 0 -> 1/1000, step 499 -> 0.5, step 999 -> 1.0, then flat.
    assert lr_multiplier(0, 1000, 100_000, "constant") == pytest.approx(0.001)
    assert lr_multiplier(499, 1000, 100_000, "constant") == pytest.approx(0.5)
    assert lr_multiplier(999, 1000, 100_000, "constant") == 1.0
    assert lr_multiplier(50_000, 1000, 100_000, "constant") == 1.0


def test_linear_and_cosine_decay_by_hand() -> None:
    # warm-up 10, total 110: decay over 100 steps. Halfway (step 60) linear -> 0.5, cosine -> 0.5.
    assert lr_multiplier(60, 10, 110, "linear") == pytest.approx(0.5)
    assert lr_multiplier(60, 10, 110, "cosine") == pytest.approx(0.5)
    # A quarter of the way: linear 0.75, cosine (1 + cos(pi/4)) / 2.
    assert lr_multiplier(35, 10, 110, "linear") == pytest.approx(0.75)
    assert lr_multiplier(35, 10, 110, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    # The floor.
    assert lr_multiplier(110, 10, 110, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(500, 10, 110, "linear", min_ratio=0.2) == pytest.approx(0.2)


def test_no_warmup_and_bad_kind() -> None:
    assert lr_multiplier(0, 0, 10, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule kind"):
        lr_multiplier(5, 0, 10, "step")
