"""The frozen DC-AE and its scaled latents."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import AutoencoderDC

    from prx_dc_ae import DCAEConfig


def stated_scale(ae_config: Mapping[str, Any]) -> float | None:
    """The checkpoint's ``scaling_factor`` if its config.json states one, else None.

    diffusers fills a missing key with the class default (1.0 for ``AutoencoderDC``) and lists it
    under ``_use_default_values``; such a value says nothing about these weights.
    """
    if "scaling_factor" in ae_config.get("_use_default_values", ()):
        return None
    value = ae_config.get("scaling_factor")
    return None if value is None else float(value)


def load_autoencoder(config: DCAEConfig, device: torch.device, dtype: torch.dtype) -> AutoencoderDC:
    """The frozen ``AutoencoderDC`` from a hub id or local directory, checked against the config."""
    from diffusers import AutoencoderDC

    where = f"'{config.path}'" + (f" (subfolder '{config.subfolder}')" if config.subfolder else "")
    try:
        ae = AutoencoderDC.from_pretrained(config.path, subfolder=config.subfolder or None, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise OSError(f"dc_ae: cannot load an AutoencoderDC from {where} ({err})") from err
    if (ae.config.latent_channels, ae.spatial_compression_ratio) != (config.channels, config.spatial_compression):
        raise ValueError(
            f"dc_ae: {where} encodes to {ae.config.latent_channels} channels at {ae.spatial_compression_ratio}x "
            f"compression, the recipe says {config.channels} at {config.spatial_compression}x"
        )
    return ae.to(device).eval().requires_grad_(False)


class DCAESpace:
    """:class:`prx_core.slots.LatentSpace`: images in [0, 1] ↔ DC-AE latents · scaling_factor.

    The generator is ignored: encoding is deterministic.
    """

    def __init__(self, ae: AutoencoderDC, config: DCAEConfig) -> None:
        scale = config.scaling_factor if config.scaling_factor is not None else stated_scale(ae.config)
        if scale is None:
            raise ValueError(
                f"dc_ae: the autoencoder config at '{config.path}' states no scaling_factor; "
                "set [latent_space] scaling_factor in the recipe"
            )
        self.ae, self.scale = ae, scale
        self.channels, self.spatial_compression = config.channels, config.spatial_compression

    def pipeline_vae(self) -> AutoencoderDC:
        """The autoencoder for a ``PRXPipeline`` export (:class:`prx_core.slots.PipelineLatentSpace`).

        The pipeline decodes ``latents / scaling_factor + shift_factor`` from the autoencoder's
        config (a missing ``shift_factor`` reads as 0, as here), so the config gets the scale this
        space uses, possibly the recipe's override. Only the config changes; this space never reads
        it after construction.
        """
        self.ae.register_to_config(scaling_factor=self.scale)
        return self.ae

    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.ae.encode((images_BCHW * 2 - 1).to(self.ae.device, self.ae.dtype)).latent * self.scale

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        z_BCHW = latents_BCHW.to(self.ae.device, self.ae.dtype) / self.scale
        return ((self.ae.decode(z_BCHW).sample + 1) / 2).clamp(0, 1)
