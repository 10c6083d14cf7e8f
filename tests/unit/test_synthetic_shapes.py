"""Tests for the offline shapes dataset: determinism, invariants, captions, read-back."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from prx_core.data.synthetic_shapes import (
    BACKGROUNDS,
    CAPTION_KEYS,
    COLOURS,
    POSITIONS,
    SHAPE_KINDS,
    SIZES,
    Scene,
    Shape,
    SyntheticShapes,
    colour_at,
    describe_long,
    describe_short,
    make_scene,
    render_scene,
)


def test_tables_are_consistent() -> None:
    assert len(POSITIONS) == 9
    assert SHAPE_KINDS == ("circle", "square", "triangle")
    assert set(SIZES) == {"small", "large"}
    assert not set(COLOURS) & set(BACKGROUNDS), "colour names must be unique across palettes"
    palette = {**COLOURS, **BACKGROUNDS}
    for a, b in itertools.combinations(palette, 2):
        assert math.dist(palette[a], palette[b]) > 100, (a, b)


def test_make_scene_is_deterministic() -> None:
    for index in range(20):
        assert make_scene(7, index) == make_scene(7, index)
        first = render_scene(make_scene(7, index), 32)
        second = render_scene(make_scene(7, index), 32)
        assert torch.equal(first, second)


def test_make_scene_does_not_use_global_rng() -> None:
    torch.manual_seed(0)
    before = make_scene(3, 5)
    torch.manual_seed(123)
    random.seed(99)
    np.random.seed(99)
    assert make_scene(3, 5) == before


def test_different_seeds_and_indices_differ() -> None:
    by_index = [make_scene(0, i) for i in range(50)]
    assert len({(s.background, s.shapes) for s in by_index}) > 45
    by_seed = [make_scene(s, 0) for s in range(50)]
    assert len({(s.background, s.shapes) for s in by_seed}) > 45
    assert [make_scene(1, i) for i in range(10)] != [make_scene(2, i) for i in range(10)]


@pytest.mark.parametrize("max_shapes", [1, 2, 4])
def test_scene_invariants(max_shapes: int) -> None:
    counts = set()
    for index in range(200):
        scene = make_scene(11, index, max_shapes=max_shapes)
        assert scene.background in BACKGROUNDS
        assert 1 <= len(scene.shapes) <= max_shapes
        counts.add(len(scene.shapes))
        positions = [shape.position for shape in scene.shapes]
        colours = [shape.colour for shape in scene.shapes]
        assert len(set(positions)) == len(positions)
        assert len(set(colours)) == len(colours)
        for shape in scene.shapes:
            assert shape.kind in SHAPE_KINDS
            assert shape.colour in COLOURS
            assert shape.colour != scene.background
            assert shape.position in POSITIONS
            assert shape.size in SIZES
        assert set(scene.captions) == set(CAPTION_KEYS)
    assert counts == set(range(1, max_shapes + 1)), "every shape count should occur"


def test_scene_is_hashable() -> None:
    scene = make_scene(0, 0)
    assert scene in {scene}


@pytest.mark.parametrize("size", [8, 32, 64, 256])
def test_render_range_dtype_and_shape(size: int) -> None:
    image_CHW = render_scene(make_scene(0, 1, max_shapes=3), size)
    assert image_CHW.shape == (3, size, size)
    assert image_CHW.dtype == torch.float32
    assert float(image_CHW.min()) >= 0.0
    assert float(image_CHW.max()) <= 1.0


def test_render_is_anti_aliased() -> None:
    scene = Scene("black", (Shape("circle", "white", "center", "large"),))
    image_CHW = render_scene(scene, 32)
    levels = torch.unique(image_CHW[0])
    assert len(levels) > 2, "edges should have intermediate values"


def test_captions_long_and_short() -> None:
    for index in range(100):
        scene = make_scene(5, index, max_shapes=3)
        long, short = scene.captions["long"], scene.captions["short"]
        assert long == describe_long(scene)
        assert short == describe_short(scene)
        assert long[0].isupper() and long.endswith(".")
        assert f"{scene.background} background" in long
        for shape in scene.shapes:
            assert f"{shape.size} {shape.colour} {shape.kind}" in long
            assert shape.position in long
            assert f"{shape.colour} {shape.kind}" in short
        assert scene.background not in short
        assert not any(size in short for size in SIZES)


def test_long_caption_wording() -> None:
    scene = Scene(
        "gray",
        (
            Shape("circle", "red", "top left", "large"),
            Shape("triangle", "blue", "bottom right", "small"),
        ),
    )
    assert describe_long(scene) == (
        "A large red circle in the top left and a small blue triangle in the bottom right, on a gray background."
    )
    assert describe_short(scene) == "red circle, blue triangle"


@pytest.mark.parametrize("size", [32, 64])
def test_colour_at_recovers_shapes_and_background(size: int) -> None:
    for index in range(150):
        scene = make_scene(21, index, max_shapes=3)
        image_CHW = render_scene(scene, size)
        occupied = {shape.position: shape.colour for shape in scene.shapes}
        for position in POSITIONS:
            expected = occupied.get(position, scene.background)
            assert colour_at(image_CHW, position) == expected, (scene, position)


def test_colour_at_every_kind_colour_size_and_position() -> None:
    for kind, colour, size, position in itertools.product(SHAPE_KINDS, COLOURS, SIZES, POSITIONS):
        background = "gray" if colour != "white" else "navy"
        scene = Scene(background, (Shape(kind, colour, position, size),))
        assert colour_at(render_scene(scene, 32), position) == colour, (kind, colour, size, position)


def test_dataset_random_access_and_held_out() -> None:
    data = SyntheticShapes(seed=4, size=32)
    assert data.scene(10) == make_scene(4, 10)
    assert torch.equal(data.image(10), render_scene(make_scene(4, 10), 32))
    held = data.held_out_scenes(64)
    assert len(held) == 64
    assert held == SyntheticShapes(seed=4, size=64).held_out_scenes(64)
    train = [data.scene(i) for i in range(64)]
    assert held != train
    assert sum(h == t for h, t in zip(held, train, strict=True)) == 0
    assert data.held_out_scenes(0) == []


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: make_scene(-1, 0), "seed"),
        (lambda: make_scene(0, -1), "index"),
        (lambda: make_scene(0, 0, max_shapes=0), "max_shapes"),
        (lambda: make_scene(0, 0, max_shapes=99), "max_shapes"),
        (lambda: render_scene(make_scene(0, 0), 0), "size"),
        (lambda: render_scene(Scene("pink", ()), 32), "pink"),
        (lambda: render_scene(Scene("gray", (Shape("hexagon", "red", "top", "small"),)), 32), "hexagon"),
        (lambda: colour_at(torch.zeros(3, 8, 8), "middle"), "middle"),
        (lambda: colour_at(torch.zeros(8, 8), "center"), r"\[3, H, W\]"),
        (lambda: SyntheticShapes(0, 0), "size"),
        (lambda: SyntheticShapes(0, 32).held_out_scenes(-1), "n"),
    ],
)
def test_bad_inputs_raise_value_error(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]
