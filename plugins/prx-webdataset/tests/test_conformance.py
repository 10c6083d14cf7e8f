"""prx-webdataset through core's shared plugin conformance suite, on a generated set of tar shards with
corrupted samples in it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from prx_core.recipe import deep_merge, load  # noqa: E402
from prx_core.testing.conformance import PluginConformance  # noqa: E402
from prx_core.testing.image_data import tiny_recipe_with_data, write_webdataset  # noqa: E402


class TestWebDatasetConformance(PluginConformance):
    plugin = "webdataset"

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _shards(cls, tmp_path_factory: pytest.TempPathFactory) -> None:
        # The suite reads a static recipe_patch; the shards live in a per-session temp folder.
        root = tmp_path_factory.mktemp("webdataset")
        write_webdataset(root, n=40, shard_size=16, corrupt=True, seed=0)
        cls.recipe_patch = {
            "model": {"patch_size": 16},  # 96-px buckets (128x64, 96x96, 64x128): a few dozen tokens
            "data": {
                "use": "webdataset",
                "shards": [str(root / "shard-{00000..00002}.tar")],
                "size": 96,
                "caption_weights": {"long": 0.8, "short": 0.2},
                "held_out": 4,
                "max_skip_ratio": 0.5,
                "index_cache": str(tmp_path_factory.mktemp("index_cache")),
            },
        }

    def _recipe(self, tmp_path: Path, extra: dict[str, Any] | None = None) -> Any:
        # Replace the tiny recipe's [data] table (synthetic_shapes keys) instead of merging into it.
        patch = deep_merge(dict(self.recipe_patch), extra or {})
        data = patch.pop("data")
        return load(tiny_recipe_with_data(tmp_path / "recipe", data, patch))
