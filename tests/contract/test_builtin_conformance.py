"""Core's own plugins pass the same conformance suite as third-party plugins."""

from __future__ import annotations

from prx_core.testing.conformance import PluginConformance


class TestFlowMatching(PluginConformance):
    plugin = "flow_matching"
    recipe_patch = {"objective": {"use": "flow_matching", "shift": 3.0}}


class TestPixel(PluginConformance):
    plugin = "pixel"
    recipe_patch = {"latent_space": {"use": "pixel"}}


class TestAdamW(PluginConformance):
    plugin = "adamw"
    recipe_patch = {"optimizer": {"use": "adamw", "weight_decay": 0.01}}


class TestPrecisionBf16Mixed(PluginConformance):
    plugin = "precision"
    recipe_patch = {"precision": {"use": "bf16_mixed"}}


class TestConsole(PluginConformance):
    plugin = "console"
    recipe_patch = {"tracker": {"use": "console", "progress": "lines"}}


class TestSyntheticShapes(PluginConformance):
    plugin = "synthetic_shapes"
    recipe_patch = {"data": {"use": "synthetic_shapes", "caption_weights": {"long": 0.5, "short": 0.5}}}
