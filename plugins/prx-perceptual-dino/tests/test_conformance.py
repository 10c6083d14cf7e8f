"""prx-perceptual-dino through core's conformance suite, on the x-prediction objective in pixel space.

The plugin requires ``objective:x_prediction``, which the prx-x-prediction package provides; the
module is skipped (not failed) where that package is not installed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.plugins import installed_plugins  # noqa: E402

if "x_prediction" not in installed_plugins():
    pytest.skip("needs the x_prediction objective (pip install -e plugins/prx-x-prediction)", allow_module_level=True)


from prx_core.context import StepContext  # noqa: E402
from prx_core.testing.conformance import PluginConformance  # noqa: E402
from prx_core.testing.fixtures import make_trainer, tiny_recipe  # noqa: E402
from prx_core.vision import write_random_weights  # noqa: E402

# The recipe patch is a class attribute, so the encoder file must exist at import time: a real
# tiny safetensors checkpoint, loaded by the plugin through the same path as a pretrained one.
_DIR = Path(tempfile.mkdtemp(prefix="prx-perceptual-dino-conformance-"))
atexit.register(shutil.rmtree, _DIR, True)
TINY_ENCODER = {"embed_dim": 32, "depth": 1, "num_heads": 2}
WEIGHTS = write_random_weights("dinov2_vitb14_reg", _DIR / "tiny_dinov2_b.safetensors", overrides=TINY_ENCODER)
PATCH: dict[str, Any] = {
    "objective": {"use": "x_prediction"},
    "plugins": {"perceptual_dino": {"weights": str(WEIGHTS), "encoder_overrides": TINY_ENCODER}},
}


class TestPerceptualDinoConformance(PluginConformance):
    plugin = "perceptual_dino"
    recipe_patch = PATCH


def test_term_gradient_reaches_the_denoiser_output_layer(tmp_path: Path) -> None:
    """In a real step, the term alone moves the model: through the encoder, into x̂0, into the final layer."""
    trainer = make_trainer(tiny_recipe(tmp_path / "r", PATCH), tmp_path / "run")
    seen: dict[str, Any] = {}
    original = trainer._loss_terms

    def spy(ctx: StepContext) -> Any:
        seen["terms"] = original(ctx)
        return seen["terms"]

    trainer._loss_terms = spy  # type: ignore[method-assign]
    trainer.micro_step(0, 0)
    (term,) = seen["terms"]
    assert term.name == "perceptual_dino" and term.value.requires_grad
    trainable = trainer.run.require("trainable")
    trainable.zero_grad(set_to_none=True)
    term.value.backward()
    final = trainable.model.final_layer.linear.weight.grad
    assert final is not None and final.abs().sum() > 0
    assert all(k.startswith("model.") for k in trainable.state_dict())  # the encoder is not saved


def test_one_step_under_bf16_mixed(tmp_path: Path) -> None:
    """Under autocast x̂0 is bf16; the encoder must still resize it and pass the gradient back."""
    patch = {**PATCH, "precision": {"use": "bf16_mixed"}}
    trainer = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    loss, terms, grad_norm = trainer.train_step(0)
    assert bool(loss.isfinite()) and bool(terms["perceptual_dino"].isfinite()) and bool(grad_norm.isfinite())
