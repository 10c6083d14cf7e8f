"""Latent space ``pixel``: the identity, images mapped to [−1, 1] (reference.md §4, "Pixel space")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class PixelConfig:
    """No settings: an RGB image is its own latent."""

    @property
    def channels(self) -> int:
        return 3

    @property
    def spatial_compression(self) -> int:
        return 1


class PixelSpace:
    channels = 3
    spatial_compression = 1

    def encode(self, images_BCHW: Any, generator: Any = None) -> Any:
        return images_BCHW * 2.0 - 1.0

    def decode(self, latents_BCHW: Any) -> Any:
        return ((latents_BCHW + 1.0) / 2.0).clamp(0.0, 1.0)


INFO = PluginInfo(name="pixel", summary="Identity latent space: RGB in [-1, 1], 3 channels", spec="reference.md §4")


def _build(config: PixelConfig, run: Any) -> PixelSpace:
    return PixelSpace()


@hookimpl
def prx_register_latent_spaces(registry: Any) -> None:
    registry.register("pixel", _build, PixelConfig)
