"""Fine-tuning from saved weights: ``[model] init`` (a diffusers folder, or ``run:RUN_DIR``).

The central check: a run started from a saved tiny PRX has, at its first step, the loss of the
saved model on that step's batch, computed here from the diffusers model's own ``forward`` and
the flow-matching loss written out: x_t = (1 − t)·x0 + t·ε, target ε − x0, mean squared error.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from prx_core import hookimpl
from prx_core.config import RecipeError
from prx_core.errors import TrainingError
from prx_core.recipe import deep_merge, dump_toml, load
from prx_core.testing.fixtures import TINY_RECIPE, make_trainer, parameters_vector, run_steps, tiny_recipe

pytestmark = pytest.mark.integration

#: The tiny recipe's denoiser as PRXTransformer2DModel arguments (MiniLM states are 384-d).
TINY_ARCHITECTURE = {**TINY_RECIPE["model"], "context_in_dim": 384}


def save_tiny_prx(folder: Path, seed: int = 7) -> Path:
    """A random tiny PRX saved as a pipeline folder's ``transformer`` (``prx-run export``'s layout)."""
    from diffusers import PRXTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PRXTransformer2DModel(**TINY_ARCHITECTURE)
    model.save_pretrained(folder / "transformer", safe_serialization=True)
    return folder


class StepRecorder:
    """A test plugin that keeps the first micro-step's tensors (it adds no loss term)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    @hookimpl
    def prx_loss_terms(self, step: Any) -> None:
        names = ("x0_BCHW", "noise_BCHW", "t_B", "x_t_BCHW", "text_BLD", "mask_BL")
        self.steps.append({name: getattr(step, name).detach().clone() for name in names})


def recipe_without_model_keys(directory: Path, model: dict[str, Any]) -> Path:
    """The tiny recipe with ``[model]`` replaced by ``model`` (so unset keys can be filled)."""
    data = copy.deepcopy(TINY_RECIPE)
    data["model"] = model
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def test_first_step_loss_is_the_saved_models_loss(tmp_path: Path) -> None:
    from diffusers import PRXTransformer2DModel

    saved = save_tiny_prx(tmp_path / "saved")
    recipe = tiny_recipe(tmp_path / "recipe", {"model": {"init": str(saved), "subfolder": "transformer"}})
    recorder = StepRecorder()
    recipe.active.manager.register(recorder, name="step_recorder")
    trainer = make_trainer(recipe, tmp_path / "run")
    (first_loss,) = run_steps(trainer, 1)

    batch = recorder.steps[0]
    x0, noise, t = batch["x0_BCHW"], batch["noise_BCHW"], batch["t_B"]
    t_B111 = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(batch["x_t_BCHW"], (1 - t_B111) * x0 + t_B111 * noise, rtol=0, atol=1e-6)
    model = PRXTransformer2DModel.from_pretrained(saved, subfolder="transformer").eval()
    with torch.no_grad():
        prediction = model(
            hidden_states=batch["x_t_BCHW"],
            timestep=t,
            encoder_hidden_states=batch["text_BLD"],
            attention_mask=batch["mask_BL"],
        ).sample
    expected = ((prediction - (noise - x0)) ** 2).mean().item()
    assert first_loss == pytest.approx(expected, rel=1e-5, abs=1e-7)

    # The same step from a random initialisation has another loss: the weights really came from init.
    fresh = make_trainer(tiny_recipe(tmp_path / "fresh"), tmp_path / "fresh_run")
    assert run_steps(fresh, 1)[0] != pytest.approx(expected, rel=1e-3)


def test_check_fills_unset_keys_and_names_the_differing_ones(tmp_path: Path) -> None:
    saved = save_tiny_prx(tmp_path / "saved")
    only_init = recipe_without_model_keys(tmp_path / "a", {"init": str(saved), "subfolder": "transformer"})
    model = load(only_init).model
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (32, 2, 2, 4)
    assert (model.in_channels, model.axes_dim, model.context_in_dim) == (3, (8, 8), 384)

    wrong = recipe_without_model_keys(
        tmp_path / "b", {"init": str(saved), "subfolder": "transformer", "depth": 3, "hidden_size": 32}
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "prx_core.cli", "check", str(only_init), str(wrong)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 1
    assert "depth = 3 (checkpoint: 2)" in result.stderr and "hidden_size" not in result.stderr
    config_file = saved / "transformer" / "config.json"
    assert f"ok   {only_init}" in result.stdout and f"(architecture agrees with {config_file})" in result.stdout

    no_subfolder = recipe_without_model_keys(tmp_path / "c", {"init": str(saved)})
    with pytest.raises(RecipeError, match="subfolder"):
        load(no_subfolder)


def test_init_from_a_run_takes_its_trained_or_ema_weights_and_resume_ignores_it(tmp_path: Path) -> None:
    ema = {"plugins": {"ema": {"decay": 0.5, "every": 1}}}
    source = make_trainer(tiny_recipe(tmp_path / "source", ema), tmp_path / "source_run")
    run_steps(source, 2)
    source.save()
    trained = parameters_vector(source)
    averaged = torch.cat([p.detach().flatten() for p in source.sampling_modules().model.parameters()])
    assert not torch.equal(trained, averaged)

    from_trained = make_trainer(
        tiny_recipe(tmp_path / "b", {"model": {"init": f"run:{tmp_path / 'source_run'}"}}), tmp_path / "b_run"
    )
    assert torch.equal(parameters_vector(from_trained), trained)

    patch = deep_merge({"model": {"init": f"run:{tmp_path / 'source_run'}", "init_ema": True}}, {})
    from_ema = make_trainer(tiny_recipe(tmp_path / "c", patch), tmp_path / "c_run")
    assert torch.equal(parameters_vector(from_ema), averaged.to(trained.dtype))

    # Resume of the fine-tune itself: its own checkpoint, even with the init source gone.
    run_steps(from_ema, 1)
    from_ema.save()
    expected_next = run_steps(from_ema, 1)
    shutil.rmtree(tmp_path / "source_run")
    resumed = make_trainer(tiny_recipe(tmp_path / "c", patch), tmp_path / "c_run", resume="auto")
    assert resumed.step == 1
    assert run_steps(resumed, 1) == expected_next


def test_init_ema_from_a_run_without_ema_is_refused(tmp_path: Path) -> None:
    source = make_trainer(tiny_recipe(tmp_path / "source"), tmp_path / "source_run")
    run_steps(source, 1)
    source.save()
    patch = {"model": {"init": f"run:{tmp_path / 'source_run'}", "init_ema": True}}
    with pytest.raises(TrainingError, match="holds no EMA weights"):
        make_trainer(tiny_recipe(tmp_path / "b", patch), tmp_path / "b_run")


def test_init_from_a_hub_id_reads_the_local_hub_cache_offline(tmp_path: Path) -> None:
    """A Hub id resolves through a pre-populated hub cache with HF_HUB_OFFLINE=1, in a real prx-run."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--prx-test--tiny-prx"
    save_tiny_prx(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    model = {"init": "prx-test/tiny-prx", "subfolder": "transformer", "revision": commit}
    recipe = recipe_without_model_keys(tmp_path / "recipe", model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "prx_core.cli", str(recipe), "--run-dir", "run", "--set", "train.steps=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model initialised from prx-test/tiny-prx (subfolder transformer)" in result.stderr
    resolved = (tmp_path / "run" / "recipe.toml").read_text(encoding="utf-8")
    assert "hidden_size = 32" in resolved and 'init = "prx-test/tiny-prx"' in resolved
    assert f'revision = "{commit}"' in resolved


def test_setup_names_the_differing_keys_when_check_could_not(tmp_path: Path) -> None:
    """Without a local config to compare at load time (here: the run's recipe.toml is gone), the
    trainer compares the checkpoint's own [model] with the model it built, before loading."""
    source = make_trainer(tiny_recipe(tmp_path / "source"), tmp_path / "source_run")
    run_steps(source, 1)
    source.save()
    (tmp_path / "source_run" / "recipe.toml").unlink()
    patch = {"model": {"init": f"run:{tmp_path / 'source_run'}", "depth": 3}}
    with pytest.raises(TrainingError, match=r"depth = 3 \(checkpoint: 2\)"):
        make_trainer(tiny_recipe(tmp_path / "b", patch), tmp_path / "b_run")
