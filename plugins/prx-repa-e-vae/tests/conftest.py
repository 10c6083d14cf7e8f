"""Tiny random REPA-E-shaped autoencoders, saved as bare diffusers folders (no subfolder)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

#: What the tiny checkpoint's config.json states, standing in for REPA-E's own fitted values.
SCALE, SHIFT = 0.5, 0.25


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 latent channels at 2x (so the tiny recipe's model fits), scale and shift in its config."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=4,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
    )
    root = tmp_path_factory.mktemp("repa_e_vae")
    vae.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def unscaled_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights with ``scaling_factor``/``shift_factor`` removed from config.json."""
    root = tmp_path_factory.mktemp("repa_e_vae_unscaled")
    config = json.loads((tiny_dir / "config.json").read_text())
    del config["scaling_factor"], config["shift_factor"]
    (root / "config.json").write_text(json.dumps(config))
    (root / "diffusion_pytorch_model.safetensors").write_bytes(
        (tiny_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    return root
