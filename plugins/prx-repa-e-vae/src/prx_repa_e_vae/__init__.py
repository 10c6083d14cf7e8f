"""Latent space ``repa_e_vae``: the REPA-E end-to-end tuned FLUX autoencoder (reference.md §4).

The same ``AutoencoderKL`` architecture and latent maths as ``flux_vae`` (16 channels at 1/8
resolution, latents ``(z − shift) · scale``), with the weights REPA-E fine-tuned jointly with a
diffusion transformer under a representation-alignment loss (``REPA-E/e2e-flux-vae``). Because
tuning moves the latent statistics, shift and scale come from the checkpoint's own config unless
the recipe sets them.

Importing this module is torch-free; ``channels`` and ``spatial_compression`` are config fields
so that ``prx-run check`` can match them against the model without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_repa_e_vae.autoencoder import RepaEVAESpace

__all__ = ["INFO", "RepaEVAEConfig", "prx_register_latent_spaces"]

INFO = PluginInfo(
    name="repa_e_vae",
    summary="Latent space: frozen REPA-E end-to-end tuned FLUX AutoencoderKL, 16 ch at 8x",
    spec="reference.md §4 (REPA-E VAE)",
    paper="https://arxiv.org/abs/2504.10483",
)


@dataclass(frozen=True)
class RepaEVAEConfig:
    """The ``[latent_space]`` table when ``use = "repa_e_vae"``."""

    #: Hub id or local directory of a diffusers ``AutoencoderKL``.
    path: str = "REPA-E/e2e-flux-vae"
    #: Directory inside ``path`` holding the autoencoder; the REPA-E repo is a bare autoencoder.
    subfolder: str = ""
    #: Sample training latents from the posterior with the step's generator; False uses its mean.
    #: Calls without a generator (validation) always use the mean, so they are repeatable.
    sample_posterior: bool = True
    #: Unset: the checkpoint config's ``scaling_factor`` (loading fails if the file does not state one).
    scaling_factor: float | None = None
    #: Unset: the checkpoint config's ``shift_factor`` (no shift if it is absent or null).
    shift_factor: float | None = None
    #: Checked against the loaded weights; used before loading by ``prx-run check``.
    channels: int = 16
    spatial_compression: int = 8

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must be a hub id or a local directory")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        if self.spatial_compression < 1 or self.spatial_compression & (self.spatial_compression - 1):
            raise ValueError(f"spatial_compression must be a power of two, got {self.spatial_compression}")


def _build(config: RepaEVAEConfig, run: Any) -> RepaEVAESpace:
    from prx_repa_e_vae.autoencoder import RepaEVAESpace, load_autoencoder, resolve_normalisation

    vae = load_autoencoder(config, run.device, run.precision.frozen_dtype)
    scale, shift = resolve_normalisation(config, vae.config)
    return RepaEVAESpace(vae, scale, shift, config)


@hookimpl
def prx_register_latent_spaces(registry: Any) -> None:
    registry.register("repa_e_vae", _build, RepaEVAEConfig)
