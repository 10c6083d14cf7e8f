"""prx-lpips through core's shared plugin conformance suite.

The suite trains the tiny recipe (16-px images), so the plugin runs with ``resize = 1.0``:
VGG16 needs at least 16 px per side, and ×0.5 would leave 8 px (the plugin refuses that at setup
rather than silently dropping VGG stages). The ImageNet VGG16 and the lpips calibration cannot be
downloaded here, so real-shaped random weight files are written once at import (59 MB trunk,
about 0.5 s) and loaded through the plugin's own loader.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

from prx_lpips.testing import write_random_weights  # noqa: E402

from prx_core.testing.conformance import PluginConformance  # noqa: E402

_WEIGHTS_DIR = tempfile.mkdtemp(prefix="prx_lpips_weights_")
atexit.register(shutil.rmtree, _WEIGHTS_DIR, ignore_errors=True)
_VGG, _LIN = write_random_weights(_WEIGHTS_DIR, seed=0)


class TestLPIPSConformance(PluginConformance):
    plugin = "lpips"
    recipe_patch: dict[str, Any] = {
        "objective": {"use": "x_prediction"},
        "plugins": {"lpips": {"resize": 1.0, "t_max": 0.9, "vgg_weights": str(_VGG), "lin_weights": str(_LIN)}},
    }
