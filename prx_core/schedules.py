"""Learning-rate multipliers (reference.md §3: 1000-step linear warm-up, then constant)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Warm-up is linear from 1/warmup to 1 over ``warmup_steps`` steps; then ``constant`` stays at 1,
    ``linear`` and ``cosine`` decay to ``min_ratio`` at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; use 'constant', 'cosine' or 'linear'")
    return min_ratio + (1.0 - min_ratio) * shape
