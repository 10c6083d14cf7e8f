"""Tests for the ``shapes_adherence`` metric: caption parsing (round trip with the data module),
rendered ground truth scores 1, each kind of mistake costs exactly its own component, noise scores
low, and the plugin wiring (recipe requirement on the synthetic_shapes data source)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import prx_shapes_adherence
import pytest
import torch
import torch.nn.functional as F
from prx_shapes_adherence import INFO, ShapesAdherenceConfig
from prx_shapes_adherence.adherence import adherence, parse_long_caption
from prx_shapes_adherence.metric import ShapesAdherenceMetric

from prx_core.config import RecipeError
from prx_core.context import RunContext
from prx_core.data.synthetic_shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPE_KINDS,
    Scene,
    Shape,
    SyntheticShapes,
    describe_long,
    describe_short,
    render_scene,
)
from prx_core.precision import Fp32
from prx_core.recipe import load
from prx_core.testing.fixtures import write_recipe

METRIC = ShapesAdherenceMetric()


def _scenes(n: int, size: int = 32, max_shapes: int = 2, seed: int = 0) -> list[Scene]:
    return SyntheticShapes(seed, size, max_shapes).held_out_scenes(n)


def _score(images: list[torch.Tensor], scenes: list[Scene]) -> torch.Tensor:
    return METRIC.features(torch.stack(images), [s.captions["long"] for s in scenes])


def _other(options: list[str] | tuple[str, ...], not_this: str) -> str:
    return next(o for o in options if o != not_this)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("max_shapes", [1, 2, 8])
def test_parse_recovers_every_held_out_scene(max_shapes: int) -> None:
    for scene in _scenes(30, max_shapes=max_shapes, seed=max_shapes):
        parsed = parse_long_caption(scene.captions["long"])
        assert (parsed.background, parsed.shapes) == (scene.background, scene.shapes)


def test_parse_accepts_surrounding_whitespace_and_rejects_other_prompts() -> None:
    scene = _scenes(1)[0]
    assert parse_long_caption(f"  {scene.captions['long']}\n").shapes == scene.shapes
    for bad in (
        describe_short(scene),  # the short caption states no position
        "a photo of a cat",
        scene.captions["long"].replace("background", "backdrop"),
        scene.captions["long"].replace(scene.shapes[0].kind, "hexagon"),
        "A small red circle in the center and a small blue square in the center, on a gray background.",
    ):
        with pytest.raises(ValueError, match="shapes_adherence"):
            parse_long_caption(bad)


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(("size", "max_shapes"), [(16, 1), (32, 2), (64, 4)])
def test_rendered_ground_truth_scores_one(size: int, max_shapes: int) -> None:
    scenes = _scenes(12, size=size, max_shapes=max_shapes)
    feats = _score([render_scene(s, size) for s in scenes], scenes)
    assert feats.shape == (12, 3)
    assert torch.equal(feats, torch.ones(12, 3))
    scores = METRIC.score(feats, None)
    assert scores == {
        "shapes_adherence": 1.0,
        "shapes_adherence/colour": 1.0,
        "shapes_adherence/background": 1.0,
        "shapes_adherence/kind": 1.0,
    }


def _one_shape_scenes(n: int = 12, size: int = 32) -> list[Scene]:
    return _scenes(n, size=size, max_shapes=1, seed=5)


def _rendered_with(scene: Scene, size: int = 32, **change: str) -> torch.Tensor:
    """The scene rendered with one attribute of its (single) shape, or its background, changed."""
    if "background" in change:
        return render_scene(dataclasses.replace(scene, background=change["background"]), size)
    shape = dataclasses.replace(scene.shapes[0], **change)
    return render_scene(Scene(background=scene.background, shapes=(shape,)), size)


def test_wrong_colour_costs_only_the_colour_component() -> None:
    scenes = _one_shape_scenes()
    images = [_rendered_with(s, colour=_other(list(COLOURS), s.shapes[0].colour)) for s in scenes]
    assert _score(images, scenes).mean(dim=0).tolist() == [0.0, 1.0, 1.0]


def test_wrong_kind_costs_only_the_kind_component() -> None:
    scenes = _one_shape_scenes()
    images = [_rendered_with(s, kind=_other(SHAPE_KINDS, s.shapes[0].kind)) for s in scenes]
    assert _score(images, scenes).mean(dim=0).tolist() == [1.0, 1.0, 0.0]


def test_wrong_background_costs_only_the_background_component() -> None:
    scenes = _one_shape_scenes()
    images = [_rendered_with(s, background=_other(list(BACKGROUNDS), s.background)) for s in scenes]
    assert _score(images, scenes).mean(dim=0).tolist() == [1.0, 0.0, 1.0]


def test_shape_in_the_wrong_cell_loses_colour_and_kind() -> None:
    scenes = [s for s in _one_shape_scenes(20) if s.shapes[0].position != "center"][:10]
    images = [_rendered_with(s, position="center") for s in scenes]
    feats = _score(images, scenes)
    assert feats[:, 0].max() == 0 and feats[:, 2].max() == 0
    # One of the eight empty cells now holds the shape: 7/8 of them still show the background.
    assert torch.allclose(feats[:, 1], torch.full((10,), 7 / 8))


def test_one_of_two_shapes_wrong_gives_half_credit() -> None:
    scenes = [s for s in _scenes(30, max_shapes=2, seed=7) if len(s.shapes) == 2][:6]
    images = []
    for s in scenes:
        first = dataclasses.replace(s.shapes[0], kind=_other(SHAPE_KINDS, s.shapes[0].kind))
        images.append(render_scene(Scene(background=s.background, shapes=(first, s.shapes[1])), 32))
    assert _score(images, scenes).mean(dim=0).tolist() == [1.0, 1.0, 0.5]


def test_blurry_generations_still_count_as_correct() -> None:
    # A young model's samples are soft; the metric must judge layout, not sharpness.
    scenes = _scenes(12, size=32, max_shapes=2, seed=9)
    kernel = torch.ones(3, 1, 3, 3) / 9
    images = [F.conv2d(render_scene(s, 32)[None], kernel, padding=1, groups=3)[0] for s in scenes]
    assert _score(images, scenes).mean().item() > 0.9


def test_uniform_noise_scores_low() -> None:
    scenes = _scenes(40, size=32, max_shapes=2, seed=11)
    g = torch.Generator().manual_seed(0)
    feats = METRIC.features(torch.rand(40, 3, 32, 32, generator=g), [s.captions["long"] for s in scenes])
    scores = METRIC.score(feats, None)
    assert scores["shapes_adherence"] < 0.2
    assert scores["shapes_adherence/colour"] < 0.15 and scores["shapes_adherence/kind"] < 0.15


def test_blank_background_has_no_shapes() -> None:
    scenes = _one_shape_scenes()
    images = [render_scene(Scene(background=s.background, shapes=()), 32) for s in scenes]
    assert _score(images, scenes).mean(dim=0).tolist() == [0.0, 1.0, 0.0]


def test_features_are_device_and_range_robust() -> None:
    scene = _scenes(1, size=32)[0]
    image = render_scene(scene, 32)
    overshoot = (image - 0.5) * 1.02 + 0.5  # slightly outside [0, 1], as raw samples can be
    assert adherence(overshoot, scene).tolist() == [1.0, 1.0, 1.0]


def test_bad_inputs_are_clear_errors() -> None:
    scene = _scenes(1)[0]
    caption = scene.captions["long"]
    with pytest.raises(ValueError, match="one prompt per image"):
        METRIC.features(torch.zeros(2, 3, 16, 16), [caption])
    with pytest.raises(ValueError, match="float images"):
        METRIC.features(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), [caption])
    with pytest.raises(ValueError, match="square"):
        METRIC.features(torch.zeros(1, 3, 16, 24), [caption])
    with pytest.raises(ValueError, match="RGB"):
        METRIC.features(torch.zeros(1, 1, 16, 16), [caption])
    with pytest.raises(ValueError, match="features"):
        METRIC.score(torch.zeros(3, 2), None)


def test_score_means_over_the_gathered_set() -> None:
    feats = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    scores = METRIC.score(feats, None)
    assert scores["shapes_adherence/colour"] == pytest.approx(0.75)
    assert scores["shapes_adherence/background"] == pytest.approx(0.75)
    assert scores["shapes_adherence/kind"] == pytest.approx(0.75)
    assert scores["shapes_adherence"] == pytest.approx(0.75)
    assert METRIC.features(torch.zeros(0, 3, 16, 16), []).shape == (0, 3)


def test_describe_long_wording_is_what_the_parser_reads() -> None:
    shape = Shape(kind="circle", colour="red", position="top left", size="large")
    caption = describe_long(Scene(background="gray", shapes=(shape,)))
    assert parse_long_caption(caption).shapes == (shape,)


# --------------------------------------------------------------------------- plugin wiring


def test_recipe_binds_and_factory_runs_on_held_out_data(tmp_path: Path) -> None:
    recipe = load(write_recipe(tmp_path, {"metrics": {"shapes_adherence": {}}}))
    choice = recipe.metrics["shapes_adherence"]
    assert choice.plugin == "shapes_adherence" and choice.config == ShapesAdherenceConfig()
    run = RunContext(recipe=recipe, device=torch.device("cpu"), run_dir=tmp_path, precision=Fp32())
    built = recipe.active.registries["metric"].get("shapes_adherence").factory(choice.config, run)
    assert built.name == "shapes_adherence" and built.needs_reference is False
    # The data source's own held-out batch: exactly the prompts the eval loop generates from.
    data = recipe.active.registries["data"].get("synthetic_shapes").factory(recipe.slot_config("data"), run)
    batch = data.held_out(0, 4)
    feats = built.features(batch.images_BCHW, batch.captions)
    assert built.score(feats, None)["shapes_adherence"] == 1.0


def test_recipe_requires_synthetic_shapes_and_takes_no_keys(tmp_path: Path) -> None:
    assert INFO.requires == ("data:synthetic_shapes",)
    with pytest.raises(RecipeError, match="metrics.shapes_adherence.size"):
        load(write_recipe(tmp_path, {"metrics": {"shapes_adherence": {"size": 3}}}))


def test_info_and_registration() -> None:
    assert INFO.name == "shapes_adherence" and INFO.conflicts == ()
    registered: list[tuple[str, type]] = []

    class Registrar:
        def register(self, name: str, factory: object, config: type) -> None:
            registered.append((name, config))

    prx_shapes_adherence.prx_register_metrics(Registrar())
    assert registered == [("shapes_adherence", ShapesAdherenceConfig)]


def test_import_is_torch_free() -> None:
    code = "import sys, prx_shapes_adherence; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
