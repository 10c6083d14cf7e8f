"""Latent space ``dc_ae``: the frozen Deep Compression Autoencoder ``AutoencoderDC`` (reference.md §4).

32 channels at 1/32 resolution (used with PRX patch 1), latents ``z · scaling_factor`` with the
factor from the checkpoint's config, as SANA does. DC-AE is deterministic: its encoder returns
latents, not a distribution, so there is no posterior to sample and ``sample_posterior = true``
is refused.

Importing this module is torch-free; ``channels`` and ``spatial_compression`` are config fields
so that ``prx-run check`` can match them against the model without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_dc_ae.autoencoder import DCAESpace

__all__ = ["INFO", "DCAEConfig", "prx_register_latent_spaces"]

INFO = PluginInfo(
    name="dc_ae",
    summary="Latent space: frozen DC-AE (AutoencoderDC), 32 ch at 32x, deterministic, scaled by its config",
    spec="reference.md §4 (DC-AE)",
    paper="https://arxiv.org/abs/2410.10733",
)


@dataclass(frozen=True)
class DCAEConfig:
    """The ``[latent_space]`` table when ``use = "dc_ae"``."""

    #: Hub id or local directory of a diffusers ``AutoencoderDC``.
    path: str = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
    subfolder: str = ""
    #: Unset: the checkpoint config's ``scaling_factor`` (loading fails if the file states none).
    scaling_factor: float | None = None
    #: Only ``false``: present so that a recipe copied from a KL latent space fails with a reason.
    sample_posterior: bool = False
    #: Checked against the loaded weights; used before loading by ``prx-run check``.
    channels: int = 32
    spatial_compression: int = 32

    def __post_init__(self) -> None:
        if self.sample_posterior:
            raise ValueError(
                "DC-AE is deterministic (its encoder returns latents, not a distribution), so there is no "
                "posterior to sample; remove sample_posterior or set it to false"
            )
        if not self.path:
            raise ValueError("path must be a hub id or a local directory")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if self.channels < 1 or self.spatial_compression < 1:
            raise ValueError(
                f"channels and spatial_compression must be >= 1, got {self.channels}, {self.spatial_compression}"
            )


def _build(config: DCAEConfig, run: Any) -> DCAESpace:
    from prx_dc_ae.autoencoder import DCAESpace, load_autoencoder

    return DCAESpace(load_autoencoder(config, run.device, run.precision.frozen_dtype), config)


@hookimpl
def prx_register_latent_spaces(registry: Any) -> None:
    registry.register("dc_ae", _build, DCAEConfig)
