"""Latent space ``flux_vae``: the frozen FLUX.1 ``AutoencoderKL`` (reference.md §3 baseline).

Images in [0, 1] are encoded to 16 channels at 1/8 resolution and normalised as
``(z − shift_factor) · scaling_factor`` with FLUX.1's 0.1159 and 0.3611; decoding inverts exactly
that map and returns images in [0, 1].

Importing this module is torch-free: ``prx-run check`` reads ``channels`` and
``spatial_compression`` from :class:`FluxVAEConfig` to match ``model.in_channels`` and the patch
size without loading any weights. The autoencoder loads in the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_flux_vae.autoencoder import FluxVAESpace

__all__ = ["INFO", "FluxVAEConfig", "prx_register_latent_spaces"]

INFO = PluginInfo(
    name="flux_vae",
    summary="Latent space: frozen FLUX.1 AutoencoderKL, 16 ch at 8x, latents (z - 0.1159) * 0.3611",
    spec="reference.md §3 (baseline), §4",
    paper="https://arxiv.org/abs/2506.15742",
)


@dataclass(frozen=True)
class FluxVAEConfig:
    """The ``[latent_space]`` table when ``use = "flux_vae"``."""

    #: Hub id or local directory of a diffusers ``AutoencoderKL``.
    path: str = "black-forest-labs/FLUX.1-dev"
    #: Directory inside ``path`` holding the autoencoder ("" for a bare autoencoder folder).
    subfolder: str = "vae"
    #: Training latents are drawn from the posterior N(μ, σ²) with the step's generator; False
    #: uses the mean μ. Calls without a generator (validation) always use μ, so they are repeatable.
    sample_posterior: bool = True
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    #: Latent channels and downsampling factor. Plain fields, not read from the weights, because
    #: ``prx-run check`` matches them against ``model.in_channels`` and the patch size before
    #: anything loads; the loaded autoencoder is checked against them.
    channels: int = 16
    spatial_compression: int = 8

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must be a hub id or a local directory")
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if self.spatial_compression < 1 or self.spatial_compression & (self.spatial_compression - 1):
            raise ValueError(f"spatial_compression must be a power of two, got {self.spatial_compression}")


def _build(config: FluxVAEConfig, run: Any) -> FluxVAESpace:
    from prx_flux_vae.autoencoder import FluxVAESpace, load_autoencoder

    vae = load_autoencoder(config, run.device, run.precision.frozen_dtype)
    return FluxVAESpace(vae, config)


@hookimpl
def prx_register_latent_spaces(registry: Any) -> None:
    registry.register("flux_vae", _build, FluxVAEConfig)
