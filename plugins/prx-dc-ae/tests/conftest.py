"""A tiny random AutoencoderDC saved as a bare diffusers folder, with a scaling factor in its config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

#: Stands in for the 0.41407 of the SANA DC-AE checkpoints.
SCALE = 0.4


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ResBlock stages: 3 latent channels at 2x, so the tiny recipe's model (in_channels 3,
    patch 4, 16 px) takes it as it is. (6, 12) widths: DC-AE's shortcuts need widths that the
    latent channel count divides."""
    from diffusers import AutoencoderDC

    torch.manual_seed(3)
    ae = AutoencoderDC(
        latent_channels=3,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(6, 12),
        decoder_block_out_channels=(6, 12),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=SCALE,
    )
    root = tmp_path_factory.mktemp("dc_ae")
    ae.save_pretrained(root)
    return root
