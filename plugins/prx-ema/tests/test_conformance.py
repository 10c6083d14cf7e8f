"""prx-ema through core's shared plugin conformance suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestEMAConformance(PluginConformance):
    plugin = "ema"
    # Update every step so the two-step and resume tests exercise the average, not just the copy.
    recipe_patch = {"plugins": {"ema": {"decay": 0.9, "every": 1}}}
