"""A tiny recipe (seconds on a CPU) and helpers to train it in-process."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from prx_core.recipe import Recipe, deep_merge, dump_toml, load
from prx_core.trainer import Trainer

#: PRX shrunk to 2 blocks of width 32 on 16-px synthetic shapes. Names the ``minilm`` text
#: encoder plugin (from plugins/prx-minilm), the real offline encoder every test uses.
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {
        "in_channels": 3,
        "patch_size": 4,
        "hidden_size": 32,
        "num_heads": 2,
        "axes_dim": [8, 8],
        "depth": 2,
    },
    "train": {
        "steps": 4,
        "global_batch": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        "sample_every": 0,
        "device": "cpu",
    },
    "schedule": {"warmup_steps": 2},
    "optimizer": {"use": "adamw", "lr": 1e-3},
    "precision": {"use": "fp32"},
    "text_encoder": {"use": "minilm", "max_length": 16},
    "data": {"use": "synthetic_shapes", "size": 16, "max_shapes": 1},
    "sampling": {"steps": 2, "num_prompts": 2, "cfg": 2.0},
    "eval": {"num_samples": 4, "batch": 4, "steps": 2, "t_bins": 2},
}


def write_recipe(directory: Path, patch: dict[str, Any] | None = None, name: str = "recipe.toml") -> Path:
    """Write the tiny recipe, deep-merged with ``patch``, as a TOML file; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = deep_merge(copy.deepcopy(TINY_RECIPE), patch or {})
    path = directory / name
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def tiny_recipe(directory: Path, patch: dict[str, Any] | None = None) -> Recipe:
    return load(write_recipe(directory, patch))


def make_trainer(recipe: Recipe, run_dir: Path, resume: str | None = None) -> Trainer:
    trainer = Trainer(recipe, run_dir, resume=resume)
    trainer.setup()
    return trainer


def run_steps(trainer: Trainer, steps: int) -> list[float]:
    """Train ``steps`` optimizer steps from the trainer's current step; returns each step's loss."""
    losses = []
    for _ in range(steps):
        loss, _, _ = trainer.train_step(trainer.step)
        trainer.step += 1
        losses.append(loss.item())
    return losses


def parameters_vector(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.run.require("trainable").parameters()])


def reverse_plugin_order(recipe: Recipe) -> None:
    """Re-register every plugin in reverse order, so additive hooks run in the opposite order."""
    manager = recipe.active.manager
    plugins = [(manager.get_name(p), p) for p in manager.get_plugins()]
    order = {name: i for i, name in enumerate(n for n, _ in plugins)}
    for _, plugin in plugins:
        manager.unregister(plugin)
    for name, plugin in sorted(plugins, key=lambda item: -order[item[0]]):
        manager.register(plugin, name=name)


def step_context(
    run: Any,
    x0_BCHW: torch.Tensor,
    images_BCHW: torch.Tensor | None,
    stash: Any,
    generator: torch.Generator | None = None,
    **extra: Any,
) -> Any:
    """A :class:`~prx_core.context.StepContext` at t = 0.5 with zero noise and 4 dummy text tokens
    (384-d), for calling a plugin's loss hook directly on chosen images and latents."""
    from prx_core.context import StepContext

    zeros = torch.zeros_like(x0_BCHW)
    batch = x0_BCHW.shape[0]
    return StepContext(
        run=run,
        step=0,
        micro_step=0,
        images_BCHW=images_BCHW,
        x0_BCHW=x0_BCHW,
        noise_BCHW=zeros,
        t_B=torch.full((batch,), 0.5),
        x_t_BCHW=zeros,
        text_BLD=torch.zeros(batch, 4, 384),
        mask_BL=torch.ones(batch, 4, dtype=torch.bool),
        stash=stash,
        generator=generator if generator is not None else torch.Generator().manual_seed(0),
        **extra,
    )
