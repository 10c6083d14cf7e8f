"""The speedrun's technique stack at toy scale: a tiny pixel-space recipe with x_prediction + lpips
+ perceptual_dino + repa + contrastive_fm + ema trains on CPU through `prx-run`, and each loss term
is logged on its own. Teachers are tiny random networks saved to disk and loaded through the real
loading code (pretrained weights can't be downloaded here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prx_core.plugins import installed_plugins
from prx_core.testing.fixtures import write_recipe

pytestmark = pytest.mark.integration
NEEDED = {"x_prediction", "lpips", "perceptual_dino", "repa", "contrastive_fm", "ema"}


def _teacher_files(directory: Path) -> dict[str, str]:
    import torchvision
    from safetensors.torch import save_file

    from prx_core.vision import write_random_weights

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    dino_b = write_random_weights("dinov2_vitb14_reg", directory / "dinov2_b.safetensors", overrides=tiny)
    dino_l = write_random_weights("dinov2_vitl14_reg", directory / "dinov2_l.safetensors", overrides=tiny)
    vgg = torchvision.models.vgg16().features.state_dict()  # random VGG16 trunk, real layer shapes
    save_file({f"features.{k}": v.contiguous() for k, v in vgg.items()}, str(directory / "vgg16.safetensors"))
    return {"dino_b": str(dino_b), "dino_l": str(dino_l), "vgg": str(directory / "vgg16.safetensors")}


def test_speedrun_stack_trains_on_cpu_with_separate_loss_terms(tmp_path: Path) -> None:
    missing = NEEDED - set(installed_plugins())
    assert not missing, f"plugins not installed: {sorted(missing)} (run scripts/setup.sh)"
    files = _teacher_files(tmp_path)
    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    recipe = write_recipe(
        tmp_path,
        {
            "train": {"steps": 3, "checkpoint_every": 3},
            "objective": {"use": "x_prediction", "shift": 3.0},
            "plugins": {
                "lpips": {"weight": 0.1, "resize": 1.0, "vgg_weights": files["vgg"]},
                "perceptual_dino": {
                    "weight": 0.01,
                    "weights": files["dino_b"],
                    "resolution": 28,
                    "encoder_overrides": tiny,
                },
                "repa": {"weight": 0.5, "layer": 0, "weights": files["dino_l"], "encoder_overrides": tiny},
                "contrastive_fm": {"weight": 0.05},
                "ema": {"decay": 0.999, "every": 1},
            },
        },
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "prx_core.cli", str(recipe), "--run-dir", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "loss" in line]  # training lines; evaluation lines follow
    assert [line["step"] for line in lines] == [1, 2, 3]
    for name in ("lpips", "perceptual_dino", "repa", "contrastive_fm"):
        assert all(f"loss/{name}" in line for line in lines), name
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert NEEDED <= set(info["plugins"])
    # Frozen teachers never enter checkpoints (reference.md §7.9).
    ckpt = next((tmp_path / "run" / "checkpoints").glob("step_*"))
    names = (ckpt / "trainable.json").read_text() + (ckpt / "plugins.json").read_text()
    assert "vgg" not in names.lower() and "teacher" not in names.lower()
