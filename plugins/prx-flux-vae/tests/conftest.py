"""The tiny random AutoencoderKL every flux_vae test loads through the plugin's real loading code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from prx_core.testing.autoencoders import save_tiny_kl_vae  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-style model folder whose ``vae`` subfolder holds a tiny random AutoencoderKL.

    Two encoder stages give 2x compression and 3 latent channels: a 16-px image becomes 3×8×8
    latents, which the tiny recipe's model (in_channels 3, patch 4) takes as it is.
    """
    root = tmp_path_factory.mktemp("flux_vae")
    save_tiny_kl_vae(root / "vae")
    return root
