"""TREAD + REPA: REPA's targets line up with the tokens TREAD keeps visible.

Neither plugin imports the other, and neither does this test: it enables both in a tiny recipe
and reads what REPA receives through the core stash keys only (``CAPTURED_FEATURES`` and
``ROUTE_PLAN``), from a test-only loss hook registered as a small local pluggy plugin. REPA's
loss is then recomputed independently (the teacher reloaded through core's loader, targets picked
with a Python loop at the plan's indices) and must match the term the trainer logged.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from prx_core import hookimpl  # noqa: E402
from prx_core.context import StepContext  # noqa: E402
from prx_core.keys import CAPTURED_FEATURES, ROUTE_PLAN  # noqa: E402
from prx_core.plugins import installed_plugins  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        "repa" not in installed_plugins(), reason="prx-repa is not installed (pip install -e plugins/prx-repa)"
    ),
    pytest.mark.skipif(
        "ema" not in installed_plugins(), reason="prx-ema is not installed (pip install -e plugins/prx-ema)"
    ),
]

TINY_TEACHER = {"embed_dim": 32, "depth": 1, "num_heads": 2}


class _StashSpy:
    """Test-only plugin: keeps what the REPA loss term reads from the stash in each micro-step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    @hookimpl
    def prx_loss_terms(self, step: StepContext) -> None:
        self.seen.append(
            {
                "plan": step.stash.get(ROUTE_PLAN),
                "captured": dict(step.stash[CAPTURED_FEATURES]),
                "images": step.images_BCHW,
                "x0": step.x0_BCHW,
            }
        )


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prx_core.vision import write_random_weights

    path = tmp_path_factory.mktemp("teacher") / "tiny_dinov2.safetensors"
    return write_random_weights("dinov2_vitl14_reg", path, overrides=TINY_TEACHER)


def _loop_neg_cos(a_BKE: torch.Tensor, b_BKE: torch.Tensor) -> float:
    total = 0.0
    for b in range(a_BKE.shape[0]):
        for k in range(a_BKE.shape[1]):
            u, v = a_BKE[b, k].double(), b_BKE[b, k].double()
            total += float(u @ v / (u.norm() * v.norm()))
    return -total / (a_BKE.shape[0] * a_BKE.shape[1])


@pytest.mark.parametrize(
    ("depth", "span", "layer", "visible"),
    [(2, (0, 1), 1, 8), (3, (0, 0), 1, 16)],  # REPA's block inside the routed span, then after it
    ids=["layer-in-span", "layer-after-span"],
)
def test_repa_targets_line_up_with_the_visible_tokens(
    weights: Path, tmp_path: Path, depth: int, span: tuple[int, int], layer: int, visible: int
) -> None:
    from prx_core.vision import load_frozen_encoder

    patch = {
        "model": {"depth": depth},
        "router": {"use": "tread", "start": span[0], "end": span[1], "ratio": 0.5},
        "plugins": {
            "repa": {
                "layer": layer,
                "projector_dim": 16,
                "weights": str(weights),
                "encoder_overrides": TINY_TEACHER,
            }
        },
    }
    recipe = tiny_recipe(tmp_path / "recipe", patch)
    spy = _StashSpy()
    recipe.active.manager.register(spy, name="stash-spy")
    trainer = make_trainer(recipe, tmp_path / "run")
    _, terms = trainer.micro_step(0, 0)

    (seen,) = spy.seen
    plan, tokens_BKH = seen["plan"], seen["captured"][layer]
    assert plan is not None and plan.visible_idx_BK.shape == (4, 8)  # 16 tokens, p = 0.5
    assert tokens_BKH.shape[:2] == (4, visible)

    teacher = load_frozen_encoder("dinov2_vitl14_reg", str(weights), overrides=TINY_TEACHER)
    projector = trainer.run.require("trainable").extras["repa"]
    with torch.no_grad():
        targets_BNE = teacher.patch_tokens(seen["images"], (4, 4))  # 16-px images, patch 4: a 4×4 grid
        if plan.start <= layer <= plan.end:
            idx = plan.visible_idx_BK
            targets_BKE = torch.stack([targets_BNE[b, idx[b]] for b in range(4)])
            # Negative control: the first K targets (ignoring the route) would give another value.
            wrong = _loop_neg_cos(projector(tokens_BKH), targets_BNE[:, :visible])
        else:
            targets_BKE, wrong = targets_BNE, None
        expected = _loop_neg_cos(projector(tokens_BKH), targets_BKE)
    assert terms["repa"].item() == pytest.approx(expected, abs=1e-5)
    if wrong is not None:
        assert abs(wrong - expected) > 1e-4


def test_tiny_recipe_with_tread_repa_and_ema_trains_and_samples_with_self_guidance(
    weights: Path, tmp_path: Path
) -> None:
    patch = {
        "router": {"use": "tread", "start": 0, "end": 1, "ratio": 0.5, "self_guidance": 1.5},
        "plugins": {
            "repa": {"layer": 1, "projector_dim": 16, "weights": str(weights), "encoder_overrides": TINY_TEACHER},
            "ema": {"decay": 0.9, "every": 1},
        },
    }
    trainer = make_trainer(tiny_recipe(tmp_path / "recipe", patch), tmp_path / "run")
    losses = run_steps(trainer, 2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainer.sampling_modules() is not trainer.run.trainable  # EMA weights sample
    assert trainer.guidance() is not None
    path = trainer.write_samples(trainer.step)
    assert path is not None and path.exists()
