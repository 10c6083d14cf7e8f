"""Reversing plugin order with REPA + contrastive FM + EMA together gives a bit-identical loss
: loss terms are summed in name order and module init is seeded per plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prx_core.plugins import installed_plugins
from prx_core.testing.fixtures import (
    make_trainer,
    parameters_vector,
    reverse_plugin_order,
    run_steps,
    tiny_recipe,
)

NEEDED = {"repa", "contrastive_fm", "ema"}


def test_repa_contrastive_fm_ema_are_order_independent(tmp_path: Path) -> None:
    missing = NEEDED - set(installed_plugins())
    if missing:
        pytest.fail(f"plugins not installed: {sorted(missing)} (run scripts/setup.sh)")
    from prx_core.vision import write_random_weights

    tiny = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    weights = write_random_weights("dinov2_vitl14_reg", tmp_path / "teacher.safetensors", overrides=tiny)
    patch = {
        "plugins": {
            "repa": {"weight": 0.5, "layer": 0, "weights": str(weights), "encoder_overrides": tiny},
            "contrastive_fm": {"weight": 0.05},
            "ema": {"decay": 0.9, "every": 1},
        }
    }
    forward = make_trainer(tiny_recipe(tmp_path / "a", patch), tmp_path / "run_a")
    expected = run_steps(forward, 3)
    recipe = tiny_recipe(tmp_path / "b", patch)
    reverse_plugin_order(recipe)
    backward = make_trainer(recipe, tmp_path / "run_b")
    assert run_steps(backward, 3) == expected
    assert torch.equal(parameters_vector(backward), parameters_vector(forward))
    ema_a = forward.sampling_modules().state_dict()
    ema_b = backward.sampling_modules().state_dict()
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert "repa" in forward.run.trainable.extras
