"""Data source ``synthetic_shapes``: coloured shapes with long and short captions, made locally.

It exists so every feature runs offline, and so caption-length effects (reference.md §4, "Caption
length") show at toy scale. Images and captions are pure functions of (seed, sample index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class SyntheticShapesConfig:
    size: int = 32
    max_shapes: int = 2
    #: Caption key -> sampling weight, drawn per sample ("long" or "short").
    caption_weights: dict[str, float] = field(default_factory=lambda: {"long": 1.0})
    #: None: the recipe's seed, so changing ``seed`` changes the data too (reference.md §7.6).
    seed: int | None = None

    def __post_init__(self) -> None:
        from prx_core.data.captions import validate_caption_weights

        if self.size < 8:
            raise ValueError("size must be >= 8")
        if not 1 <= self.max_shapes <= 8:
            raise ValueError("max_shapes must be in 1..8")
        validate_caption_weights(self.caption_weights, available=("long", "short"))


class SyntheticShapesSource:
    def __init__(self, config: SyntheticShapesConfig, seed: int) -> None:
        from prx_core.data.synthetic_shapes import SyntheticShapes

        self.config = config
        self.seed = config.seed if config.seed is not None else seed
        self.shapes = SyntheticShapes(self.seed, config.size, config.max_shapes)
        weights = ",".join(f"{k}={v}" for k, v in sorted(config.caption_weights.items()))
        self.fingerprint = (
            f"synthetic_shapes:seed={self.seed}:size={config.size}:max_shapes={config.max_shapes}:captions={weights}"
        )

    def batch(self, request: Any) -> Any:
        import torch

        from prx_core.data.captions import pick_caption_keys
        from prx_core.seeding import generator_for
        from prx_core.slots import RawBatch

        first = request.first_sample()
        indices = range(first, first + request.size)
        scenes = [self.shapes.scene(i) for i in indices]
        images_BCHW = torch.stack([self.shapes.image(i) for i in indices])
        keys = pick_caption_keys(self.config.caption_weights, request.size, generator_for(self.seed, "captions", first))
        return RawBatch(images_BCHW=images_BCHW, captions=[s.captions[k] for s, k in zip(scenes, keys, strict=True)])

    def held_out_captions(self, n: int) -> list[str]:
        return [scene.captions["long"] for scene in self.shapes.held_out_scenes(n)]

    def held_out(self, start: int, n: int) -> Any:
        import torch

        from prx_core.data.synthetic_shapes import render_scene
        from prx_core.slots import RawBatch

        scenes = self.shapes.held_out_scenes(start + n)[start:]
        images_BCHW = torch.stack([render_scene(scene, self.config.size) for scene in scenes])
        return RawBatch(images_BCHW=images_BCHW, captions=[scene.captions["long"] for scene in scenes])


INFO = PluginInfo(
    name="synthetic_shapes",
    summary="Offline toy data: coloured shapes at stated positions, long and short captions",
    spec="reference.md §4 (caption length)",
)


def _build(config: SyntheticShapesConfig, run: Any) -> SyntheticShapesSource:
    return SyntheticShapesSource(config, run.recipe.seed)


@hookimpl
def prx_register_data_sources(registry: Any) -> None:
    registry.register("synthetic_shapes", _build, SyntheticShapesConfig)
