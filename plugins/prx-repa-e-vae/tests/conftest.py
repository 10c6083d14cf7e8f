"""Tiny random REPA-E-shaped autoencoders, saved as bare diffusers folders (no subfolder)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from prx_core.testing.autoencoders import save_tiny_kl_vae  # noqa: E402

#: What the tiny checkpoint's config.json states, standing in for REPA-E's own fitted values.
SCALE, SHIFT = 0.5, 0.25


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 latent channels at 2x (so the tiny recipe's model fits), scale and shift in its config."""
    root = tmp_path_factory.mktemp("repa_e_vae")
    save_tiny_kl_vae(root, seed=1, scaling_factor=SCALE, shift_factor=SHIFT)
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
