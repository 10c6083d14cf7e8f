"""FLUX.2's patchification and batch-norm latent normalisation, and the frozen autoencoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prx_flux2_ae import AE_PATCH

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2

    from prx_flux2_ae import Flux2AEConfig


def patchify(z_BCHW: torch.Tensor, p: int = AE_PATCH) -> torch.Tensor:
    """(B, C, H, W) → (B, C·p², H/p, W/p), channel-major: output channel c·p² + dy·p + dx.

    The layout of ``Flux2Pipeline._patchify_latents``, which the batch-norm statistics index.
    """
    b, c, h, w = z_BCHW.shape
    if h % p or w % p:
        raise ValueError(
            f"flux2_ae: latents of {h}x{w} cannot be cut into {p}x{p} patches for the batch-norm statistics; "
            f"use images whose sides divide by {p} x the autoencoder's compression"
        )
    z = z_BCHW.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * p * p, h // p, w // p)


def unpatchify(z_BCHW: torch.Tensor, p: int = AE_PATCH) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, cpp, h, w = z_BCHW.shape
    z = z_BCHW.reshape(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, cpp // (p * p), h * p, w * p)


def load_autoencoder(config: Flux2AEConfig, device: torch.device, dtype: torch.dtype) -> AutoencoderKLFlux2:
    """The frozen ``AutoencoderKLFlux2`` from a hub id or local directory, checked against the config."""
    from diffusers import AutoencoderKLFlux2

    where = f"'{config.path}'" + (f" (subfolder '{config.subfolder}')" if config.subfolder else "")
    try:
        ae = AutoencoderKLFlux2.from_pretrained(config.path, subfolder=config.subfolder or None, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise OSError(f"flux2_ae: cannot load an AutoencoderKLFlux2 from {where} ({err})") from err
    found = (
        int(ae.config.latent_channels),
        2 ** (len(ae.config.block_out_channels) - 1),
        tuple(ae.config.patch_size),
    )
    wanted = (config.ae_channels, config.ae_compression, (AE_PATCH, AE_PATCH))
    if found != wanted:
        raise ValueError(
            f"flux2_ae: {where} has (latent channels, compression, bn patch) = {found}, the recipe expects "
            f"{wanted}; set ae_channels / ae_compression to the autoencoder's"
        )
    return ae.to(device).eval().requires_grad_(False)


class Flux2Space:
    """:class:`prx_core.slots.LatentSpace`: images in [0, 1] ↔ FLUX.2 latents normalised by ``bn``.

    The statistics are read once from the (frozen, eval-mode) batch-norm buffers in the
    autoencoder's dtype, as the FLUX.2 pipeline reads them; the layer itself never runs, so its
    running statistics can never be updated by training batches.
    """

    def __init__(self, ae: AutoencoderKLFlux2, config: Flux2AEConfig) -> None:
        self.ae = ae
        self.channels, self.spatial_compression = config.channels, config.spatial_compression
        self.packed = config.layout == "packed"
        self.sample_posterior = config.sample_posterior
        self.mean_1C11 = ae.bn.running_mean.view(1, -1, 1, 1)
        self.std_1C11 = torch.sqrt(ae.bn.running_var.view(1, -1, 1, 1) + ae.config.batch_norm_eps)

    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        posterior = self.ae.encode((images_BCHW * 2 - 1).to(self.ae.device, self.ae.dtype)).latent_dist
        z_BCHW = (
            posterior.sample(generator=generator)
            if self.sample_posterior and generator is not None
            else posterior.mode()
        )
        normalised_BCHW = (patchify(z_BCHW) - self.mean_1C11) / self.std_1C11
        return normalised_BCHW if self.packed else unpatchify(normalised_BCHW)

    def encode_distribution(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior in the normalised space (:class:`prx_core.slots.DistributionLatentSpace`).

        Patchify and the batch-norm normalisation act per (channel, sub-pixel) as x ↦ (x − m)/s, so
        the normalised posterior has mean (patchify(μ) − m)/s and std patchify(σ)/s, laid out like
        ``encode``'s output; the mean is ``encode(images, None)``.
        """
        posterior = self.ae.encode((images_BCHW * 2 - 1).to(self.ae.device, self.ae.dtype)).latent_dist
        mean_BCHW = (patchify(posterior.mean) - self.mean_1C11) / self.std_1C11
        std_BCHW = patchify(posterior.std) / self.std_1C11
        if self.packed:
            return mean_BCHW, std_BCHW
        return unpatchify(mean_BCHW), unpatchify(std_BCHW)

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        latents_BCHW = latents_BCHW.to(self.ae.device, self.ae.dtype)
        packed_BCHW = latents_BCHW if self.packed else patchify(latents_BCHW)
        z_BCHW = unpatchify(packed_BCHW * self.std_1C11 + self.mean_1C11)
        return ((self.ae.decode(z_BCHW).sample + 1) / 2).clamp(0, 1)
