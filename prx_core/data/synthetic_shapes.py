"""A deterministic, offline text-to-image toy dataset of coloured shapes.

Why it exists: every training feature must be runnable on a CPU with no network and no
downloaded data, and caption-fidelity effects (long vs short captions, caption dropout,
guidance) must be *measurable* at toy scale. A scene here is one to a few coloured shapes
at named cells of a 3x3 grid, each small or large, on a coloured background. Every scene
carries a long caption that pins down everything in the image (size, colour, kind,
position, background) and a short one that leaves most of it out (colour and kind only),
so a model trained on one or the other should differ visibly in how well it follows the
text. :func:`colour_at` reads an image back at a grid cell, which is what an adherence
metric needs to score generations against their captions without a learned judge.

Everything is a pure function of its arguments: scenes come from a generator seeded only
by ``(seed, stream, index)``, never from global random state, and rendering is plain
arithmetic on a fixed grid, so the same index gives the bitwise-same image on every run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# Shape colours, 0-255 RGB. Chosen far apart from each other and from every background
# (pairwise distance > 100), so a colour survives anti-aliasing and a blurry generation
# and :func:`colour_at` can still name it.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 200, 50),
    "blue": (40, 90, 240),
    "yellow": (245, 235, 40),
    "magenta": (220, 40, 220),
    "cyan": (40, 225, 225),
    "orange": (255, 130, 0),
    "white": (245, 245, 245),
}

# Backgrounds: darker or duller than any shape colour so a shape always stands out.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "navy": (20, 20, 120),
    "brown": (110, 65, 25),
}

SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle")

# Centre of each grid cell as (cx, cy), fractions of the image side; y grows downwards.
# Neighbouring centres are 0.3 apart, more than the largest shape extent (0.2), so a shape
# never covers another shape's centre.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top": (0.5, 0.2),
    "top right": (0.8, 0.2),
    "left": (0.2, 0.5),
    "center": (0.5, 0.5),
    "right": (0.8, 0.5),
    "bottom left": (0.2, 0.8),
    "bottom": (0.5, 0.8),
    "bottom right": (0.8, 0.8),
}

# Shape radius as a fraction of the side: a large shape is ~10 px across at 32 px.
SIZES: dict[str, float] = {
    "small": 0.10,
    "large": 0.16,
}

CAPTION_KEYS: tuple[str, ...] = ("long", "short")
"""The caption variants every :class:`Scene` carries, for caption-weight validation."""

# How each position reads inside a sentence ("a red circle in the top left").
_POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}

# Square half-side and triangle circumradius relative to the shape radius: picked so the
# three kinds look about equally big, and the triangle's inscribed circle (0.625 r) still
# holds the patch that :func:`colour_at` reads at the centre.
_SQUARE_HALF_SIDE = 0.9
_TRIANGLE_CIRCUMRADIUS = 1.25

_SUPERSAMPLE = 4  # anti-aliasing: render at 4x and average-pool down.
_PATCH_HALF_WIDTH = 0.03  # colour_at's patch half-width, as a fraction of the side.

# Stream tags go into the seed's spawn key, so training and held-out scenes come from
# generators that can never share a seed (see make_scene and SyntheticShapes).
_TRAIN_STREAM = 0
_HELD_OUT_STREAM = 1

_POSITION_ORDER: tuple[str, ...] = tuple(POSITIONS)
_MAX_SHAPES_LIMIT = min(len(POSITIONS), len(COLOURS))


@dataclass(frozen=True)
class Shape:
    """One shape in a scene; every field is a key of the matching module-level table."""

    kind: str
    colour: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    """A background and its shapes (in reading order of their positions), plus captions.

    ``captions`` is left out of hashing (a dict cannot be hashed) but not out of equality;
    it is derived from the other fields anyway.
    """

    background: str
    shapes: tuple[Shape, ...]
    captions: dict[str, str] = field(default_factory=dict, hash=False)


def _check_non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _check_max_shapes(max_shapes: object) -> int:
    if isinstance(max_shapes, bool) or not isinstance(max_shapes, int | np.integer):
        raise ValueError(f"max_shapes must be an int, got {max_shapes!r}")
    if not 1 <= max_shapes <= _MAX_SHAPES_LIMIT:
        raise ValueError(f"max_shapes must be between 1 and {_MAX_SHAPES_LIMIT}, got {max_shapes}")
    return int(max_shapes)


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise ValueError(f"size must be an int, got {size!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return int(size)


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe_long(scene: Scene) -> str:
    """Caption that states everything rendered: size, colour, kind, position, background.

    Example: "A large red circle in the top left and a small blue triangle in the bottom
    right, on a gray background." The wording is fixed so the only thing varying between
    captions is the scene itself.
    """
    parts = [
        f"a {shape.size} {shape.colour} {shape.kind} {_POSITION_PHRASES[shape.position]}" for shape in scene.shapes
    ]
    text = f"{_join(parts)}, on a {scene.background} background."
    return text[0].upper() + text[1:]


def describe_short(scene: Scene) -> str:
    """Caption with colours and kinds only, e.g. "red circle, blue triangle".

    It leaves positions, sizes and background to the model's prior, which is the point:
    training on it should give visibly worse layout adherence than the long caption.
    """
    return ", ".join(f"{shape.colour} {shape.kind}" for shape in scene.shapes)


def _scene_from_stream(seed: int, index: int, max_shapes: int, stream: int) -> Scene:
    # The seed is the entropy; (stream, index) is the spawn key. numpy pads the entropy to
    # its full pool before appending the spawn key, so no (seed, stream, index) triple can
    # alias another (unlike SeedSequence([a, b]) vs SeedSequence([a, b, 0])).
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(stream, index)))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    n_shapes = int(rng.integers(1, max_shapes + 1))
    position_ids = sorted(int(i) for i in rng.choice(len(_POSITION_ORDER), size=n_shapes, replace=False))
    colour_names = list(COLOURS)
    colour_ids = rng.choice(len(colour_names), size=n_shapes, replace=False)
    size_names = list(SIZES)
    shapes = tuple(
        Shape(
            kind=SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))],
            colour=colour_names[int(colour_id)],
            position=_POSITION_ORDER[position_id],
            size=size_names[int(rng.integers(len(size_names)))],
        )
        for position_id, colour_id in zip(position_ids, colour_ids, strict=True)
    )
    bare = Scene(background=background, shapes=shapes)
    return Scene(
        background=background,
        shapes=shapes,
        captions={"long": describe_long(bare), "short": describe_short(bare)},
    )


def make_scene(seed: int, index: int, max_shapes: int = 2) -> Scene:
    """The training scene at ``index`` of the stream named by ``seed``.

    A pure function of its arguments: it seeds a local numpy generator from
    ``(seed, index)`` and never touches global random state, so data loading can be
    resumed, sharded or replayed from an index alone. The scene has 1..``max_shapes``
    shapes at distinct grid cells, with colours distinct from each other; shape colours
    and backgrounds come from disjoint palettes, so no shape matches its background.
    """
    seed = _check_non_negative_int(seed, "seed")
    index = _check_non_negative_int(index, "index")
    max_shapes = _check_max_shapes(max_shapes)
    return _scene_from_stream(seed, index, max_shapes, _TRAIN_STREAM)


@functools.lru_cache(maxsize=16)
def _grid(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Sample-centre coordinates as fractions of the side; cached because every image of a
    # given size needs the same grid. Callers must not modify the returned tensors.
    coords_S = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    return coords_S.view(1, side), coords_S.view(side, 1)


def _mask(shape: Shape, x_1S: torch.Tensor, y_S1: torch.Tensor) -> torch.Tensor:
    cx, cy = POSITIONS[shape.position]
    radius = SIZES[shape.size]
    dx_1S = x_1S - cx
    dy_S1 = y_S1 - cy
    if shape.kind == "circle":
        return dx_1S * dx_1S + dy_S1 * dy_S1 <= radius * radius
    if shape.kind == "square":
        half = radius * _SQUARE_HALF_SIDE
        return (dx_1S.abs() <= half) & (dy_S1.abs() <= half)
    if shape.kind == "triangle":
        # Equilateral, pointing up, centred on its centroid. Inside means on the inner side
        # of all three edges; each edge is at distance apothem = circumradius / 2.
        apothem = radius * _TRIANGLE_CIRCUMRADIUS / 2
        half_sqrt3 = math.sqrt(3) / 2
        bottom_S1 = dy_S1 <= apothem
        upper_left_SS = -half_sqrt3 * dx_1S - 0.5 * dy_S1 <= apothem
        upper_right_SS = half_sqrt3 * dx_1S - 0.5 * dy_S1 <= apothem
        return bottom_S1 & upper_left_SS & upper_right_SS
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}")


def _check_scene(scene: Scene) -> None:
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {list(BACKGROUNDS)}")
    for shape in scene.shapes:
        if shape.kind not in SHAPE_KINDS:
            raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPE_KINDS}")
        if shape.colour not in COLOURS:
            raise ValueError(f"unknown shape colour {shape.colour!r}; expected one of {list(COLOURS)}")
        if shape.position not in POSITIONS:
            raise ValueError(f"unknown position {shape.position!r}; expected one of {list(POSITIONS)}")
        if shape.size not in SIZES:
            raise ValueError(f"unknown shape size {shape.size!r}; expected one of {list(SIZES)}")


def render_scene(scene: Scene, size: int) -> torch.Tensor:
    """Render ``scene`` as a float32 ``[3, size, size]`` tensor in [0, 1].

    Shapes are rasterised on a grid ``4x`` finer and average-pooled down, which gives
    anti-aliased edges (hard edges at 32 px would teach a model aliasing, not shapes).
    Pure tensor arithmetic on CPU, so the output is bitwise-identical across runs; about a
    millisecond at 32 px and still quick at 256 px.
    """
    size = _check_size(size)
    _check_scene(scene)
    side = size * _SUPERSAMPLE
    x_1S, y_S1 = _grid(side)
    background_3 = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32) / 255.0
    canvas_3SS = background_3.view(3, 1, 1).expand(3, side, side).contiguous()
    for shape in scene.shapes:
        colour_311 = (torch.tensor(COLOURS[shape.colour], dtype=torch.float32) / 255.0).view(3, 1, 1)
        mask_SS = _mask(shape, x_1S, y_S1)
        canvas_3SS = torch.where(mask_SS, colour_311, canvas_3SS)
    image_3HW = F.avg_pool2d(canvas_3SS.unsqueeze(0), _SUPERSAMPLE).squeeze(0)
    return image_3HW.clamp_(0.0, 1.0)


def _patch_bounds(centre: float, extent: int) -> tuple[int, int]:
    # Pixels whose centres lie within the patch half-width of `centre` (in pixels); at
    # least one pixel, so tiny images still answer.
    centre_px = centre * extent
    half_px = max(0.5, _PATCH_HALF_WIDTH * extent)
    lo = min(max(0, round(centre_px - half_px)), extent - 1)
    hi = min(extent, max(lo + 1, round(centre_px + half_px)))
    return lo, hi


def colour_at(image_CHW: torch.Tensor, position: str) -> str:
    """Name the palette colour nearest to the image at a grid cell's centre.

    Reads the mean RGB of a small patch (half-width 3% of the side) at the cell centre
    and returns the nearest entry of :data:`COLOURS` or :data:`BACKGROUNDS`. The patch
    lies inside every shape drawn there, so on a rendered scene this recovers the shape's
    colour, or the background at an empty cell; on a generated image it scores whether
    the model put the captioned colour where the caption said.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; expected one of {list(POSITIONS)}")
    if not isinstance(image_CHW, torch.Tensor) or image_CHW.ndim != 3 or image_CHW.shape[0] != 3:
        shape = tuple(image_CHW.shape) if isinstance(image_CHW, torch.Tensor) else type(image_CHW)
        raise ValueError(f"image_CHW must be an RGB tensor of shape [3, H, W], got {shape}")
    _, height, width = image_CHW.shape
    if height < 1 or width < 1:
        raise ValueError(f"image_CHW must be non-empty, got shape {tuple(image_CHW.shape)}")
    cx, cy = POSITIONS[position]
    x_lo, x_hi = _patch_bounds(cx, width)
    y_lo, y_hi = _patch_bounds(cy, height)
    patch_3hw = image_CHW[:, y_lo:y_hi, x_lo:x_hi].detach().to(device="cpu", dtype=torch.float64)
    mean_3 = patch_3hw.mean(dim=(1, 2)) * 255.0
    palette = {**COLOURS, **BACKGROUNDS}
    names = list(palette)
    palette_P3 = torch.tensor([palette[name] for name in names], dtype=torch.float64)
    distance_P = ((palette_P3 - mean_3) ** 2).sum(dim=1)
    return names[int(distance_P.argmin())]


class SyntheticShapes:
    """Random-access view of the shapes dataset: scene and image for any index.

    Training indices are the non-negative integers, an endless stream, so a sampler can
    draw from it forever and resume from a step counter alone. Held-out scenes come from
    a second stream under the same seed: the generator's spawn key carries a stream tag
    (0 for training, 1 for held-out) next to the index, so no held-out draw ever reuses a
    training draw's seed. Note the scene *space* is finite (about 2.9e5 distinct scenes
    at ``max_shapes=2``), so an identical scene can still turn up in both streams by
    chance; held-out guarantees independent draws, not unseen compositions.
    """

    def __init__(self, seed: int, size: int, max_shapes: int = 2) -> None:
        self.seed = _check_non_negative_int(seed, "seed")
        self.size = _check_size(size)
        self.max_shapes = _check_max_shapes(max_shapes)

    def __repr__(self) -> str:
        return f"SyntheticShapes(seed={self.seed}, size={self.size}, max_shapes={self.max_shapes})"

    def scene(self, index: int) -> Scene:
        """The training scene at ``index`` (any non-negative int)."""
        return make_scene(self.seed, index, self.max_shapes)

    def image(self, index: int) -> torch.Tensor:
        """The rendered training image at ``index``: float32 ``[3, size, size]`` in [0, 1]."""
        return render_scene(self.scene(index), self.size)

    def held_out_scenes(self, n: int) -> list[Scene]:
        """The first ``n`` scenes of the held-out stream, for evaluation and sample grids.

        Deterministic in ``(seed, max_shapes)`` and independent of how many training
        indices were consumed, so evaluations are comparable across runs.
        """
        n = _check_non_negative_int(n, "n")
        return [_scene_from_stream(self.seed, i, self.max_shapes, _HELD_OUT_STREAM) for i in range(n)]
