"""prx-contrastive-fm through core's shared plugin conformance suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestContrastiveFMConformance(PluginConformance):
    plugin = "contrastive_fm"
    recipe_patch = {"plugins": {"contrastive_fm": {"weight": 0.05}}}
