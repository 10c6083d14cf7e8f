"""Loading the REPA-E autoencoder, and where its latent shift and scale come from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from prx_repa_e_vae import RepaEVAEConfig


def resolve_normalisation(config: RepaEVAEConfig, vae_config: Mapping[str, Any]) -> tuple[float, float]:
    """(scale, shift): the recipe's values where set, else those the checkpoint's config states.

    diffusers fills a key missing from ``config.json`` with the class default (0.18215, Stable
    Diffusion's scale) and lists it under ``_use_default_values``; such a value says nothing
    about these weights, so a missing scale is an error rather than a silent 0.18215.
    """
    defaulted = set(vae_config.get("_use_default_values", ()))
    scale = config.scaling_factor
    if scale is None:
        if "scaling_factor" in defaulted or vae_config.get("scaling_factor") is None:
            raise ValueError(
                f"repa_e_vae: the autoencoder config at '{config.path}' states no scaling_factor; "
                "set [latent_space] scaling_factor (and shift_factor) in the recipe"
            )
        scale = float(vae_config["scaling_factor"])
    shift = config.shift_factor
    if shift is None:
        # Absent or null means "no shift" in diffusers' convention (SD-style VAEs).
        shift = float(vae_config.get("shift_factor") or 0.0)
    return scale, shift


def load_autoencoder(config: RepaEVAEConfig, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The frozen ``AutoencoderKL`` from a hub id or local directory, checked against the config's shape."""
    from diffusers import AutoencoderKL

    where = f"'{config.path}'" + (f" (subfolder '{config.subfolder}')" if config.subfolder else "")
    try:
        vae = AutoencoderKL.from_pretrained(config.path, subfolder=config.subfolder or None, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise OSError(f"repa_e_vae: cannot load an AutoencoderKL from {where}: {err}") from err
    channels, factor = int(vae.config.latent_channels), 2 ** (len(vae.config.block_out_channels) - 1)
    if (channels, factor) != (config.channels, config.spatial_compression):
        raise ValueError(
            f"repa_e_vae: {where} gives {channels} channels at {factor}x, the recipe says "
            f"{config.channels} at {config.spatial_compression}x; set channels/spatial_compression to match"
        )
    return vae.to(device).eval().requires_grad_(False)


class RepaEVAESpace:
    """:class:`prx_core.slots.LatentSpace`: images in [0, 1] ↔ (z − shift) · scale."""

    def __init__(self, vae: AutoencoderKL, scale: float, shift: float, config: RepaEVAEConfig) -> None:
        self.vae, self.scale, self.shift = vae, scale, shift
        self.channels, self.spatial_compression = config.channels, config.spatial_compression
        self.sample_posterior = config.sample_posterior

    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        posterior = self.vae.encode((images_BCHW * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        use_sample = self.sample_posterior and generator is not None
        return ((posterior.sample(generator=generator) if use_sample else posterior.mode()) - self.shift) * self.scale

    def encode_distribution(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior in the normalised space: N((μ − shift)·scale, (σ·scale)²)
        (:class:`prx_core.slots.DistributionLatentSpace`); the mean is ``encode(images, None)``."""
        posterior = self.vae.encode((images_BCHW * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        return (posterior.mean - self.shift) * self.scale, posterior.std * self.scale

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        z_BCHW = latents_BCHW.to(self.vae.device, self.vae.dtype) / self.scale + self.shift
        return ((self.vae.decode(z_BCHW).sample + 1) / 2).clamp(0, 1)
