"""prx-minilm through core's shared plugin conformance suite."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestMiniLMConformance(PluginConformance):
    plugin = "minilm"
    recipe_patch = {"text_encoder": {"use": "minilm", "max_length": 12}}
