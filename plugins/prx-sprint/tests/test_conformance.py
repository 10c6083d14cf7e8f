"""prx-sprint through core's shared plugin conformance suite (tiny model: depth 2, span 0..1)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestSprintConformance(PluginConformance):
    plugin = "sprint"
    recipe_patch = {"router": {"use": "sprint", "start": 0, "end": 1, "ratio": 0.75}}
