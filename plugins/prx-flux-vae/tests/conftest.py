"""The tiny random AutoencoderKL every flux_vae test loads through the plugin's real loading code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-style model folder whose ``vae`` subfolder holds a tiny random AutoencoderKL.

    Two encoder stages give 2x compression and 3 latent channels: a 16-px image becomes 3×8×8
    latents, which the tiny recipe's model (in_channels 3, patch 4) takes as it is.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=4,
    )
    root = tmp_path_factory.mktemp("flux_vae")
    vae.save_pretrained(root / "vae")
    return root
