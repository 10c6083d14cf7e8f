"""prx-flux-vae through core's shared plugin conformance suite, on a tiny random AutoencoderKL."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestFluxVAEConformance(PluginConformance):
    plugin = "flux_vae"

    @pytest.fixture(autouse=True)
    def _use_tiny_vae(self, tiny_dir: Path) -> None:
        # The patch needs the saved model's path, which exists only once the fixture has run. The
        # tiny autoencoder's 3 channels at 2x keep the tiny recipe's model valid with this latent
        # space and without it (the suite also loads the patch minus the slot).
        self.recipe_patch = {
            "latent_space": {"use": "flux_vae", "path": str(tiny_dir), "channels": 3, "spatial_compression": 2}
        }
