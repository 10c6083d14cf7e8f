"""prx-t5gemma through core's shared plugin conformance suite, on a tiny random T5Gemma."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from prx_t5gemma.testing import save_tiny_t5gemma  # noqa: E402

from prx_core.testing.conformance import PluginConformance  # noqa: E402

# Built once at import: recipe_patch is a class attribute, read before any fixture runs.
_TINY = save_tiny_t5gemma(Path(tempfile.mkdtemp(prefix="prx_t5gemma_")))


class TestT5GemmaConformance(PluginConformance):
    plugin = "t5gemma"
    recipe_patch = {"text_encoder": {"use": "t5gemma", "path": str(_TINY), "dim": 32, "max_length": 16}}
