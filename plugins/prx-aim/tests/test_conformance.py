"""prx-aim through core's shared plugin conformance suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestAimConformance(PluginConformance):
    plugin = "aim"
    recipe_patch = {"tracker": {"use": "aim"}}
