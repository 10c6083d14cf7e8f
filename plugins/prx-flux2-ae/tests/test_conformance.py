"""prx-flux2-ae through core's shared plugin conformance suite, on a tiny random AutoencoderKLFlux2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestFlux2AEConformance(PluginConformance):
    plugin = "flux2_ae"

    @pytest.fixture(autouse=True)
    def _use_tiny_ae(self, tiny_dir: Path) -> None:
        # Set per test: the saved model's path exists only once the fixture has run.
        self.recipe_patch = {
            "latent_space": {"use": "flux2_ae", "path": str(tiny_dir), "ae_channels": 3, "ae_compression": 2}
        }
