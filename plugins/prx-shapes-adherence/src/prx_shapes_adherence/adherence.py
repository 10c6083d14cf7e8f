"""Scoring generated synthetic-shapes images against the layout their long caption states.

A long caption (``prx_core.data.synthetic_shapes.describe_long``) names every shape's size, colour,
kind and grid position, and the background. :func:`parse_long_caption` turns it back into the
:class:`Scene` (checked by regenerating the caption), and :func:`adherence` scores an image on
three independent questions:

* **colour**: for each stated shape, is the palette colour at its cell centre the stated one
  (:func:`colour_at`)? Fraction of the shapes.
* **background**: at every empty cell, is the colour there the stated background? Fraction of the
  empty cells (a scene has at most 8 shapes on 9 cells, so there is always one).
* **kind**: for each stated shape, does the stated kind explain the image around its cell better
  than the other kinds *and* than no shape at all? Candidates are rendered with
  :func:`render_scene`: the stated scene with that one shape swapped to each kind, or removed,
  compared with the image by mean squared error over the shape's neighbourhood. To keep the
  components independent, candidates use the colours the image actually shows (the palette colour
  found at the shape's cell, the background found at the empty cells) where those are valid, so a
  right shape in the wrong colour loses only its colour point. Fraction of the shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter

import torch

from prx_core.data.synthetic_shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPE_KINDS,
    SIZES,
    Scene,
    Shape,
    colour_at,
    describe_long,
    render_scene,
)

#: Half-width of the window compared for the kind test, as a fraction of the side: the largest
#: shape extent (a large triangle's vertex at 0.2) plus a margin for anti-aliasing.
_WINDOW_HALF_WIDTH = 0.22
#: Components, in the column order of :func:`adherence`'s output.
COMPONENTS: tuple[str, ...] = ("colour", "background", "kind")


@functools.lru_cache(maxsize=1)
def _shape_phrases() -> dict[str, Shape]:
    """Every single-shape phrase ("a large red circle in the top left") and its shape.

    Derived from ``describe_long`` itself rather than restated, so the parser follows any change
    of wording in the data module.
    """
    phrases: dict[str, Shape] = {}
    background = next(iter(BACKGROUNDS))
    suffix = f", on a {background} background."
    for size in SIZES:
        for colour in COLOURS:
            for kind in SHAPE_KINDS:
                for position in POSITIONS:
                    shape = Shape(kind=kind, colour=colour, position=position, size=size)
                    text = describe_long(Scene(background=background, shapes=(shape,)))
                    if not text.endswith(suffix):
                        raise RuntimeError(f"unexpected long-caption wording {text!r}; update the parser")
                    phrase = text[: -len(suffix)]
                    phrases[phrase[0].lower() + phrase[1:]] = shape
    return phrases


def parse_long_caption(caption: str) -> Scene:
    """The scene a long caption describes; ValueError if it is not one ``describe_long`` writes."""
    text = caption.strip()
    body, sep, tail = text.rpartition(", on a ")
    background = tail.removesuffix(" background.")
    if not sep or background == tail or background not in BACKGROUNDS or not body:
        raise ValueError(
            f"shapes_adherence: cannot read a background from the prompt {caption!r}; it scores only the long "
            "captions of the synthetic_shapes data source"
        )
    phrases = _shape_phrases()
    shapes = []
    for part in re.split(r", | and ", body[0].lower() + body[1:]):
        shape = phrases.get(part)
        if shape is None:
            raise ValueError(f"shapes_adherence: cannot read a shape from {part!r} in the prompt {caption!r}")
        shapes.append(shape)
    scene = Scene(background=background, shapes=tuple(shapes))
    if describe_long(scene) != text or len({s.position for s in shapes}) != len(shapes):
        raise ValueError(f"shapes_adherence: the prompt {caption!r} is not a synthetic_shapes long caption")
    return scene


def _window(position: str, size: int) -> tuple[slice, slice]:
    cx, cy = POSITIONS[position]
    half = _WINDOW_HALF_WIDTH * size

    def span(centre: float) -> slice:
        lo = max(0, int(centre * size - half))
        return slice(lo, min(size, max(lo + 1, int(round(centre * size + half)))))

    return span(cy), span(cx)


def _observed_background(image_3HW: torch.Tensor, scene: Scene, empty: list[str]) -> tuple[str, list[bool]]:
    names = [colour_at(image_3HW, position) for position in empty]
    correct = [name == scene.background for name in names]
    seen = Counter(name for name in names if name in BACKGROUNDS)
    return (seen.most_common(1)[0][0] if seen else scene.background), correct


def _window_error(
    image_3HW: torch.Tensor, background: str, shapes: tuple[Shape, ...], rows: slice, cols: slice
) -> float:
    """Mean squared error between the image and a rendered candidate scene, inside one window."""
    rendered_3HW = render_scene(Scene(background=background, shapes=shapes), image_3HW.shape[-1])
    return float(((rendered_3HW[:, rows, cols] - image_3HW[:, rows, cols]) ** 2).mean())


def adherence(image_3HW: torch.Tensor, scene: Scene) -> torch.Tensor:
    """Fractions of (colour, background, kind) correct for one image, as a float tensor [3]."""
    if image_3HW.ndim != 3 or image_3HW.shape[0] != 3 or image_3HW.shape[1] != image_3HW.shape[2]:
        raise ValueError(f"shapes_adherence: expected a square RGB image [3, S, S], got {tuple(image_3HW.shape)}")
    image_3HW = image_3HW.detach().to(device="cpu").float().clamp(0.0, 1.0)
    size = image_3HW.shape[-1]
    empty = [p for p in POSITIONS if p not in {s.position for s in scene.shapes}]
    background, background_ok = _observed_background(image_3HW, scene, empty)

    found = [colour_at(image_3HW, shape.position) for shape in scene.shapes]
    colour_ok = [name == shape.colour for name, shape in zip(found, scene.shapes, strict=True)]
    # Candidates carry the colours the image shows where those are palette-valid, so the kind test
    # judges outlines only. A shape whose cell shows a background colour keeps its stated colour
    # (then "no shape" is the likely best fit, as it should be).
    observed = tuple(
        Shape(kind=s.kind, colour=name if name in COLOURS else s.colour, position=s.position, size=s.size)
        for s, name in zip(scene.shapes, found, strict=True)
    )
    kind_ok = []
    for index, shape in enumerate(observed):
        rows, cols = _window(shape.position, size)
        others = observed[:index] + observed[index + 1 :]
        errors = {
            kind: _window_error(image_3HW, background, (*others, dataclasses.replace(shape, kind=kind)), rows, cols)
            for kind in SHAPE_KINDS
        }
        rivals = [e for kind, e in errors.items() if kind != shape.kind]
        rivals.append(_window_error(image_3HW, background, others, rows, cols))  # no shape at all
        # Ties go to the stated kind: at tiny sizes two kinds can render identically.
        kind_ok.append(errors[shape.kind] <= min(rivals))

    def fraction(flags: list[bool]) -> float:
        return sum(flags) / len(flags)

    return torch.tensor([fraction(colour_ok), fraction(background_ok), fraction(kind_ok)])
