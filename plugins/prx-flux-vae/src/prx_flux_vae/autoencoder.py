"""Loading the FLUX.1 autoencoder and the latent normalisation around it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from prx_flux_vae import FluxVAEConfig


def normalise(z_BCHW: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Raw autoencoder latents to the denoiser's: (z − shift) · scale (reference.md §3)."""
    return (z_BCHW - shift) * scale


def denormalise(latents_BCHW: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Exact inverse of :func:`normalise`."""
    return latents_BCHW / scale + shift


def load_autoencoder(config: FluxVAEConfig, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained(path, subfolder)``, frozen, on ``device`` in ``dtype``.

    The one loading path for hub ids and local directories; the result is checked against the
    config's ``channels`` and ``spatial_compression``, which the recipe check already used.
    """
    from diffusers import AutoencoderKL

    where = f"'{config.path}'" + (f" (subfolder '{config.subfolder}')" if config.subfolder else "")
    try:
        # The dtype is the precision policy's call, not the checkpoint's; asking from_pretrained for
        # it (rather than casting afterwards) also honours any module diffusers keeps in fp32.
        vae = AutoencoderKL.from_pretrained(config.path, subfolder=config.subfolder or None, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise OSError(
            f"flux_vae: cannot load an AutoencoderKL from {where} ({err}); offline, download the folder "
            "elsewhere and set [latent_space] path to the local copy"
        ) from err
    found = (int(vae.config.latent_channels), 2 ** (len(vae.config.block_out_channels) - 1))
    if found != (config.channels, config.spatial_compression):
        raise ValueError(
            f"flux_vae: the autoencoder at {where} has {found[0]} channels at {found[1]}x compression but "
            f"[latent_space] says channels = {config.channels}, spatial_compression = "
            f"{config.spatial_compression}; set them to the autoencoder's (and model.in_channels to match)"
        )
    return vae.to(device).eval().requires_grad_(False)


class FluxVAESpace:
    """:class:`prx_core.slots.LatentSpace` over a frozen ``AutoencoderKL``.

    Latents come out in the autoencoder's (frozen) dtype; the trainer casts them. No ``no_grad``
    here: the weights are frozen, so no graph is built unless a caller's input needs gradients.
    """

    def __init__(self, vae: AutoencoderKL, config: FluxVAEConfig) -> None:
        self.vae = vae
        self.channels = config.channels
        self.spatial_compression = config.spatial_compression
        self.scale, self.shift = config.scaling_factor, config.shift_factor
        self.sample_posterior = config.sample_posterior

    def pipeline_vae(self) -> AutoencoderKL:
        """The autoencoder for a ``PRXPipeline`` export (:class:`prx_core.slots.PipelineLatentSpace`).

        The pipeline decodes ``latents / scaling_factor + shift_factor`` from the autoencoder's
        config, so that config is set to this space's normalisation (a checkpoint may state other
        values, or none). Only the config changes; this space never reads it.
        """
        self.vae.register_to_config(scaling_factor=self.scale, shift_factor=self.shift)
        return self.vae

    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        signed_BCHW = (images_BCHW * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(signed_BCHW).latent_dist
        sample = self.sample_posterior and generator is not None
        z_BCHW = posterior.sample(generator=generator) if sample else posterior.mode()
        return normalise(z_BCHW, self.shift, self.scale)

    def encode_distribution(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior N(μ, σ²) in the normalised space (:class:`prx_core.slots.DistributionLatentSpace`).

        The normalisation is affine, so the normalised posterior is N((μ − shift)·scale, (σ·scale)²);
        its mean is what ``encode(images, None)`` returns, and mean + std·ε with the ε that
        ``encode(images, generator)`` draws gives that sample.
        """
        signed_BCHW = (images_BCHW * 2 - 1).to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(signed_BCHW).latent_dist
        return normalise(posterior.mean, self.shift, self.scale), posterior.std * self.scale

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        z_BCHW = denormalise(latents_BCHW.to(device=self.vae.device, dtype=self.vae.dtype), self.shift, self.scale)
        return ((self.vae.decode(z_BCHW).sample + 1) / 2).clamp(0, 1)
