"""Choosing which caption variant each sample trains on.

A sample can carry several captions (e.g. ``"long"`` and ``"short"``). Mixing them with
fixed weights is how a recipe trades prompt adherence against robustness to terse prompts,
so the weights are checked up front (a typo'd key or a NaN would otherwise silently train
on the wrong mix), and the draw is made with an explicit ``torch.Generator`` so a resumed
run picks the same captions as the original.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: recipe checks validate weights without it
    import torch


def validate_caption_weights(weights: Mapping[str, float], available: Iterable[str] | None = None) -> dict[str, float]:
    """Check caption weights and return them as a plain ``{key: float}`` dict, sorted by key.

    Weights need not sum to one (they are relative), but they must be finite and
    non-negative with a positive sum, and the mapping must be non-empty. When ``available``
    is given, every key must be one of those captions; an unknown key raises a ValueError
    that lists the available keys and suggests the closest match.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"caption weights must be a mapping of caption key to weight, got {weights!r}")
    if len(weights) == 0:
        raise ValueError("caption weights are empty; give at least one caption key with a positive weight")
    checked: dict[str, float] = {}
    for key in sorted(weights, key=str):
        if not isinstance(key, str):
            raise ValueError(f"caption key {key!r} must be a string")
        raw = weights[key]
        if isinstance(raw, bool):
            raise ValueError(f"caption weight for {key!r} must be a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"caption weight for {key!r} must be a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"caption weight for {key!r} must be finite, got {raw!r}")
        if value < 0:
            raise ValueError(f"caption weight for {key!r} must be >= 0, got {raw!r}")
        checked[key] = value
    if sum(checked.values()) <= 0:
        raise ValueError(f"caption weights must have a positive sum, got {dict(weights)!r}")
    if available is not None:
        known = sorted(set(available))
        for key in checked:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown caption key {key!r}; available: {', '.join(known) or '(none)'}{hint}")
    return checked


def pick_caption_keys(weights: Mapping[str, float], n: int, generator: torch.Generator) -> list[str]:
    """Draw ``n`` caption keys independently, each with probability proportional to its weight.

    Keys are taken in sorted order, so two mappings with the same contents give the same
    draws from the same generator state whatever their insertion order. Zero-weight keys
    are never chosen. The draw runs on the generator's device, consuming only its state.
    """
    import torch

    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {generator!r}")
    checked = validate_caption_weights(weights)
    if n == 0:
        return []
    keys = sorted(checked)
    probs_K = torch.tensor([checked[key] for key in keys], dtype=torch.float64, device=generator.device)
    picks_N = torch.multinomial(probs_K, n, replacement=True, generator=generator)
    return [keys[i] for i in picks_N.tolist()]
