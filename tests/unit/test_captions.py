"""Tests for caption-weight validation and weighted caption-key draws."""

from __future__ import annotations

import math

import pytest
import torch

from prx_core.data.captions import pick_caption_keys, validate_caption_weights


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_validate_returns_sorted_float_dict() -> None:
    checked = validate_caption_weights({"short": 1, "long": 3}, available=["long", "short"])
    assert checked == {"long": 3.0, "short": 1.0}
    assert list(checked) == ["long", "short"]
    assert all(isinstance(v, float) for v in checked.values())


def test_validate_allows_zero_weights_when_sum_positive() -> None:
    assert validate_caption_weights({"long": 1.0, "short": 0.0}) == {"long": 1.0, "short": 0.0}


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({}, "empty"),
        ({"long": -0.5, "short": 1.0}, "'long'.*>= 0"),
        ({"long": math.nan}, "'long'.*finite"),
        ({"long": math.inf}, "'long'.*finite"),
        ({"long": 0.0, "short": 0.0}, "positive sum"),
        ({"long": "lots"}, "'long'.*number"),
    ],
)
def test_validate_rejects_bad_weights(weights: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_caption_weights(weights)  # type: ignore[arg-type]


def test_validate_unknown_key_lists_available_and_suggests() -> None:
    with pytest.raises(ValueError) as info:
        validate_caption_weights({"lnog": 1.0}, available=("long", "short"))
    message = str(info.value)
    assert "'lnog'" in message
    assert "long, short" in message
    assert "did you mean 'long'" in message


def test_validate_unknown_key_without_close_match() -> None:
    with pytest.raises(ValueError, match="available: long, short") as info:
        validate_caption_weights({"zzzzzz": 1.0}, available=["short", "long"])
    assert "did you mean" not in str(info.value)


def test_pick_proportions_match_weights() -> None:
    keys = pick_caption_keys({"long": 0.75, "short": 0.25}, 4000, _generator(1))
    assert len(keys) == 4000
    counts = {"long": 0, "short": 0}
    for key in keys:
        counts[key] += 1
    assert abs(counts["long"] / 4000 - 0.75) < 0.03
    assert abs(counts["short"] / 4000 - 0.25) < 0.03


def test_pick_never_chooses_zero_weight() -> None:
    keys = pick_caption_keys({"long": 1.0, "short": 0.0, "tags": 2.0}, 3000, _generator(2))
    assert "short" not in keys
    assert {"long", "tags"} <= set(keys)


def test_pick_is_independent_of_dict_order_and_reproducible() -> None:
    forward = pick_caption_keys({"long": 0.6, "short": 0.3, "tags": 0.1}, 500, _generator(3))
    backward = pick_caption_keys({"tags": 0.1, "short": 0.3, "long": 0.6}, 500, _generator(3))
    assert forward == backward
    other_seed = pick_caption_keys({"long": 0.6, "short": 0.3, "tags": 0.1}, 500, _generator(4))
    assert forward != other_seed


def test_pick_uses_only_the_given_generator() -> None:
    torch.manual_seed(0)
    first = pick_caption_keys({"long": 0.5, "short": 0.5}, 100, _generator(5))
    torch.manual_seed(1)
    second = pick_caption_keys({"long": 0.5, "short": 0.5}, 100, _generator(5))
    assert first == second


def test_pick_zero_draws_and_bad_inputs() -> None:
    assert pick_caption_keys({"long": 1.0}, 0, _generator()) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        pick_caption_keys({"long": 1.0}, -1, _generator())
    with pytest.raises(ValueError, match="positive sum"):
        pick_caption_keys({"long": 0.0}, 3, _generator())
    with pytest.raises(ValueError, match="generator"):
        pick_caption_keys({"long": 1.0}, 3, None)  # type: ignore[arg-type]
