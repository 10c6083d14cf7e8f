"""prx-qwen3vl through core's shared plugin conformance suite, on a tiny random Qwen3-VL."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from prx_qwen3vl.testing import save_tiny_qwen3vl  # noqa: E402

from prx_core.testing.conformance import PluginConformance  # noqa: E402

# Built once at import: recipe_patch is a class attribute, read before any fixture runs.
_TINY = save_tiny_qwen3vl(Path(tempfile.mkdtemp(prefix="prx_qwen3vl_")))


class TestQwen3VLConformance(PluginConformance):
    plugin = "qwen3vl"
    recipe_patch = {"text_encoder": {"use": "qwen3vl", "path": str(_TINY), "dim": 32, "max_length": 16}}
