"""prx-resolution-aware through core's shared plugin conformance suite, in both modes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402


class TestResolutionAwareTokenConformance(PluginConformance):
    plugin = "resolution_aware"
    recipe_patch = {"plugins": {"resolution_aware": {"mode": "token"}}}


class TestResolutionAwareVecConformance(PluginConformance):
    plugin = "resolution_aware"
    recipe_patch = {"plugins": {"resolution_aware": {"mode": "vec"}}}
