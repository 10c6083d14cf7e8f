"""Latent space ``flux2_ae``: the frozen FLUX.2 autoencoder ``AutoencoderKLFlux2`` (reference.md §4).

Not a plain KL VAE with a scale: FLUX.2 normalises its latents with the running mean and variance
of a batch-norm layer (``bn``, no affine part) kept over 2×2-patchified latents, i.e. per
(channel, sub-pixel) pair, 4 × 32 = 128 statistics. The plugin patchifies exactly as diffusers'
``Flux2Pipeline`` does, normalises with ``(x − running_mean) / sqrt(running_var + eps)``, and
(by default) un-patchifies again, so the denoiser sees 32 channels at 1/8 resolution — the published
"in_ch 32" with the PRX patch 2, whose 2×2 unfold puts the same 128 values in each token.
``layout = "packed"`` hands over the patchified 128 channels at 1/16 instead (use patch 1).

Importing this module is torch-free; ``channels`` and ``spatial_compression`` are derived from
config fields so that ``prx-run check`` needs no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_flux2_ae.autoencoder import Flux2Space

__all__ = ["INFO", "Flux2AEConfig", "prx_register_latent_spaces"]

#: FLUX.2 normalises 2×2 patches of latents; its pipeline hard-codes this size too.
AE_PATCH = 2

INFO = PluginInfo(
    name="flux2_ae",
    summary="Latent space: frozen FLUX.2 AutoencoderKLFlux2, 32 ch at 8x, batch-norm statistics normalisation",
    spec="reference.md §4 (FLUX.2 AE)",
    paper="https://bfl.ai/blog/flux-2",
)


@dataclass(frozen=True)
class Flux2AEConfig:
    """The ``[latent_space]`` table when ``use = "flux2_ae"``."""

    #: Hub id or local directory of a diffusers ``AutoencoderKLFlux2`` (FLUX.2 [klein] repos also
    #: ship one under ``vae``).
    path: str = "black-forest-labs/FLUX.2-dev"
    subfolder: str = "vae"
    #: Sample training latents from the posterior with the step's generator; False uses its mean
    #: (what FLUX.2's pipeline does for reference images). No generator (validation): the mean.
    sample_posterior: bool = True
    #: "spatial": normalised latents un-patchified, ae_channels at ae_compression (PRX patch 2).
    #: "packed": the 2×2-patchified latents, 4·ae_channels at 2·ae_compression (PRX patch 1).
    layout: Literal["spatial", "packed"] = "spatial"
    #: The autoencoder's own latent channels and downsampling; checked against the weights.
    ae_channels: int = 32
    ae_compression: int = 8

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must be a hub id or a local directory")
        if self.ae_channels < 1:
            raise ValueError(f"ae_channels must be >= 1, got {self.ae_channels}")
        if self.ae_compression < 1 or self.ae_compression & (self.ae_compression - 1):
            raise ValueError(f"ae_compression must be a power of two, got {self.ae_compression}")

    @property
    def channels(self) -> int:
        return self.ae_channels * AE_PATCH**2 if self.layout == "packed" else self.ae_channels

    @property
    def spatial_compression(self) -> int:
        return self.ae_compression * AE_PATCH if self.layout == "packed" else self.ae_compression


def _build(config: Flux2AEConfig, run: Any) -> Flux2Space:
    from prx_flux2_ae.autoencoder import Flux2Space, load_autoencoder

    return Flux2Space(load_autoencoder(config, run.device, run.precision.frozen_dtype), config)


@hookimpl
def prx_register_latent_spaces(registry: Any) -> None:
    registry.register("flux2_ae", _build, Flux2AEConfig)
