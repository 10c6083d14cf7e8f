"""Real images with corrupted files under `torchrun --nproc_per_node 2`: both ranks train every step
(same batch size, no crash), the bad files are counted by reason across ranks, and a resume replays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prx_core.testing.image_data import read_manifest, tiny_recipe_with_data, write_image_folder

from .test_cli import prx_run

pytestmark = pytest.mark.integration


def test_two_ranks_train_through_bad_files_and_resume_exactly(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "images", n=48, corrupt=True, seed=0)
    data = {
        "use": "image_folder",
        "root": str(root),
        "size": 32,
        "caption_weights": {"long": 0.8, "short": 0.2},
        "held_out": 4,
        "max_skip_ratio": 0.5,
        "index_cache": str(tmp_path / "cache"),
    }
    patch = {"train": {"steps": 4, "global_batch": 4, "checkpoint_every": 2, "log_every": 1}}
    recipe = tiny_recipe_with_data(tmp_path / "recipe", data, patch)
    prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path, nproc=2)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    # Files rejected from their header are counted once per rank that indexes them; some exist.
    manifest = read_manifest(root)["items"].values()
    assert any(str(item["expect"]).startswith("skipped/") for item in manifest)
    counted = {k: v for k, v in steps[-1].items() if k.startswith("data/") and v}
    assert counted, f"no bad-data counts in {sorted(steps[-1])}"

    # Drop the last two steps and resume from the step-2 checkpoint on two ranks: same losses.
    first = [x["loss"] for x in steps]
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000004")
    prx_run(str(recipe), "--run-dir", "run", "--resume", "auto", cwd=tmp_path, nproc=2)
    again = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in again if "loss" in x] == first
