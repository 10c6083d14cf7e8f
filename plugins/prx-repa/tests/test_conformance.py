"""prx-repa through core's shared plugin conformance suite, with a tiny random DINOv2-shaped teacher."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.testing.conformance import PluginConformance  # noqa: E402
from prx_core.vision import write_random_weights  # noqa: E402

# The recipe patch is a class attribute, so the teacher file must exist at import time: a real
# tiny safetensors checkpoint, loaded by the plugin through the same path as a pretrained one.
_DIR = Path(tempfile.mkdtemp(prefix="prx-repa-conformance-"))
atexit.register(shutil.rmtree, _DIR, True)
TINY_TEACHER = {"embed_dim": 32, "depth": 1, "num_heads": 2}
WEIGHTS = write_random_weights("dinov2_vitl14_reg", _DIR / "tiny_dinov2.safetensors", overrides=TINY_TEACHER)


class TestRepaConformance(PluginConformance):
    plugin = "repa"
    recipe_patch = {
        "plugins": {
            "repa": {
                "layer": 0,
                "projector_dim": 16,
                "encoder": "dinov2_vitl14_reg",
                "weights": str(WEIGHTS),
                "encoder_overrides": TINY_TEACHER,
            }
        }
    }
