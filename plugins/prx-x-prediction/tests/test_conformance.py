"""prx-x-prediction through core's shared plugin conformance suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestXPredictionConformance(PluginConformance):
    plugin = "x_prediction"
    # Pixel space (the tiny recipe's latent space) with the pixel-recipe shift, as JiT trains.
    recipe_patch = {"objective": {"use": "x_prediction", "shift": 3.0}}
