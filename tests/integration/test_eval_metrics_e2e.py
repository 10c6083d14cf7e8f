"""Issue 7's check: a tiny run with evaluation on reports validation loss, shapes_adherence, FID,
CMMD and DINO-MMD (tiny random feature networks loaded through the real loaders) in both
metrics.jsonl and the Aim repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prx_core.plugins import installed_plugins
from prx_core.testing.fixtures import write_recipe

pytestmark = pytest.mark.integration
NEEDED = {"fid", "cmmd", "dino_mmd", "shapes_adherence", "aim"}


def _inception_file(directory: Path) -> Path:
    """torchmetrics' FID Inception-v3 with its default random init (its weight download skipped)."""
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as tf
    from torchmetrics.image.fid import NoTrainInceptionV3

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None)
        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    path = directory / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


def _clip_dir(directory: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(directory / "clip")
    return directory / "clip"


def test_eval_metrics_reach_jsonl_and_aim(tmp_path: Path) -> None:
    missing = NEEDED - set(installed_plugins())
    assert not missing, f"plugins not installed: {sorted(missing)} (run scripts/setup.sh)"
    from prx_core.vision import write_random_weights

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    dino = write_random_weights("dinov2_vitl14_reg", tmp_path / "dino.safetensors", overrides=tiny)
    recipe = write_recipe(
        tmp_path,
        {
            "train": {"steps": 2, "checkpoint_every": 2},
            "tracker": {"use": "aim"},
            "eval": {"num_samples": 6, "batch": 6, "steps": 2, "t_bins": 2},
            "metrics": {
                "fid": {"inception_weights": str(_inception_file(tmp_path))},
                "cmmd": {"model": str(_clip_dir(tmp_path))},
                "dino_mmd": {"weights": str(dino), "resolution": 28, "encoder_overrides": tiny},
                "shapes_adherence": {},
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
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluation = [x for x in lines if "eval/loss" in x][-1]
    names = ("fid", "cmmd", "dino_mmd", "shapes_adherence")
    for name in names:
        assert f"eval/{name}" in evaluation, name
        assert evaluation[f"eval/{name}"] == evaluation[f"eval/{name}"], f"{name} is NaN"

    import aim
    from aim.storage.context import Context

    (run,) = list(aim.Repo(str(tmp_path / "run" / "aim")).iter_runs())
    for name in ("loss", *names):
        metric = run.get_metric(name, Context({"subset": "eval"}))
        assert metric is not None, name
        steps, (values, *_) = metric.data.items_list()
        assert list(steps) == [2]
        key = "eval/loss" if name == "loss" else f"eval/{name}"
        assert values[0] == pytest.approx(evaluation[key])
