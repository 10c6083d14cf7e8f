"""A tiny random AutoencoderKLFlux2 with non-trivial batch-norm statistics, saved under ``vae``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 latent channels at 2x (12 batch-norm statistics after 2×2 patchification).

    With the default "spatial" layout a 16-px image gives 3×8×8 latents, which the tiny recipe's
    model (in_channels 3, patch 4) takes as it is. Fresh batch-norm buffers are mean 0, variance
    1, which would make the normalisation invisible, so they are randomised before saving.
    """
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(2)
    ae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=4,
    )
    ae.bn.running_mean.normal_(0.0, 0.5)
    ae.bn.running_var.uniform_(0.2, 3.0)
    root = tmp_path_factory.mktemp("flux2_ae")
    ae.save_pretrained(root / "vae")
    return root
