"""A two-stage recipe end to end: stage directories, continued steps, carried weights and state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prx_core.checkpoint import CheckpointManager
from prx_core.recipe import load
from prx_core.testing.fixtures import write_recipe
from prx_core.trainer import Trainer

from .test_cli import prx_run, training_lines

pytestmark = pytest.mark.integration

STAGED = {
    "train": {"checkpoint_every": 10, "log_every": 1},
    "plugins": {"ema": {"decay": 0.9, "every": 1}},
    "router": {"use": "sprint", "start": 0, "end": 1, "ratio": 0.5},
    "stages": [
        {"name": "small", "steps": 3},
        {"name": "large", "steps": 2, "remove": ["router"], "data": {"size": 32}, "train": {"global_batch": 2}},
    ],
}


def test_two_stages_continue_one_run(tmp_path: Path) -> None:
    recipe_path = write_recipe(tmp_path, STAGED)
    prx_run(str(recipe_path), "--run-dir", "run", cwd=tmp_path)
    run = tmp_path / "run"
    index = json.loads((run / "stages.json").read_text())
    assert [(s["name"], s["state"], s["last_step"]) for s in index["stages"]] == [
        ("small", "done", 3),
        ("large", "done", 5),
    ]
    first, second = run / "stages" / "1-small", run / "stages" / "2-large"
    assert [line["step"] for line in training_lines(first)] == [1, 2, 3]
    assert [line["step"] for line in training_lines(second)] == [4, 5]
    assert "size = 32" in (second / "recipe.toml").read_text()
    assert (second / "final" / "transformer").is_dir()

    # Stage 2 started from stage 1's last weights, with AdamW moments mapped by parameter name.
    recipe = load(recipe_path)
    stage_one = CheckpointManager(first / "checkpoints").latest_valid()
    assert stage_one is not None and stage_one.step == 3
    parts, _ = CheckpointManager(first / "checkpoints").load(stage_one)
    trainer = Trainer(recipe.stages[1].recipe, tmp_path / "again", continue_from=(stage_one, 3))
    trainer.setup()
    assert trainer.step == 3
    state = trainer.run.require("trainable").state_dict()
    for key, value in parts["trainable"].items():
        if key in state:
            assert torch.equal(state[key], value), key
    assert any("sprint" in k for k in parts["trainable"]) and not any("sprint" in k for k in state)
    names = trainer._optimizer_param_names()
    saved_names = parts["trainer"]["param_names"]
    weight = "model.blocks.0.img_qkv_proj.weight" if "model.blocks.0.img_qkv_proj.weight" in names else names[0]
    carried = trainer.optimizer.state_dict()["state"][names.index(weight)]["exp_avg"]
    assert torch.equal(carried, parts["optimizer"]["state"][saved_names.index(weight)]["exp_avg"])
    # EMA averages carried over (non-strict: the SPRINT fusion's average is left behind).
    ema = parts["plugins"]["ema"]
    live_ema = trainer.plugin_states()["ema"].state_dict()
    shared = sorted(set(live_ema) & set(ema))
    assert shared and all(torch.equal(live_ema[k], ema[k]) for k in shared)
    assert any("sprint" in k for k in ema) and not any("sprint" in k for k in live_ema)

    # An interrupted second stage is redone from stage 1 with --resume auto, identically.
    before = training_lines(second)
    shutil.rmtree(second)
    result = prx_run(str(recipe_path), "--run-dir", "run", "--resume", "auto", cwd=tmp_path)
    assert "finished step 5" in result.stdout
    after = training_lines(second)
    assert [line["loss"] for line in after] == [line["loss"] for line in before]


def test_a_fresh_start_refuses_an_existing_staged_run(tmp_path: Path) -> None:
    recipe_path = write_recipe(tmp_path, {**STAGED, "stages": [{"name": "only", "steps": 1}]})
    prx_run(str(recipe_path), "--run-dir", "run", cwd=tmp_path)
    result = prx_run(str(recipe_path), "--run-dir", "run", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "--resume auto" in result.stderr


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_stages_under_two_gloo_ranks(tmp_path: Path, parallel: str) -> None:
    """Stage 2 starts from stage 1 on 2 ranks too (FSDP2 gathers fresh tensors collectively)."""
    staged = {
        "train": {"checkpoint_every": 10, "log_every": 1, "parallel": parallel},
        "router": {"use": "sprint", "start": 0, "end": 1, "ratio": 0.5},
        "stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 2, "remove": ["router"], "data": {"size": 32}}],
    }
    recipe = write_recipe(tmp_path, staged)
    prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path, nproc=2)
    second = tmp_path / "run" / "stages" / "2-b"
    assert [line["step"] for line in training_lines(second)] == [3, 4]
    assert "stage starts at step 2" in (second / "train.log").read_text()
