"""The memory estimate: activations counted on fake CUDA tensors, checked against hand-derived
byte counts, and every shipped GPU recipe fitting an 80 GB card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prx_core.memory import GIB, HEADROOM_GIB, count_activations, estimate_recipe, with_checkpointing
from prx_core.recipe import ModelConfig, load

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
HIDDEN, TOKENS_SIDE, PATCH, TEXT, BATCH = 64, 8, 2, 6, 2
IMAGE_TOKENS = (TOKENS_SIDE // PATCH) ** 2  # 16


def _tiny(mlp_ratio: float) -> ModelConfig:
    shape = {"num_heads": 2, "depth": 2, "axes_dim": (16, 16), "in_channels": 4, "patch_size": PATCH}
    return ModelConfig(hidden_size=HIDDEN, mlp_ratio=mlp_ratio, **shape)


def _block_bytes(mlp_ratio: float, batch: int, autocast: torch.dtype | None) -> int:
    # Block 1: block 0 also holds the first saves of tensors every block shares (text, RoPE).
    return count_activations(_tiny(mlp_ratio), 32, batch, TOKENS_SIDE, TEXT, torch.float32, autocast).per_block[1]


def test_mlp_width_adds_its_four_saved_activations_by_hand() -> None:
    # The MLP is down(gelu(gate(x)) * up(x)): autograd keeps gate(x) (for gelu), gelu(gate(x)) and
    # up(x) (for the product) and the product (for down), each B × L × M. Widening M by ΔM adds
    # 4·B·L·ΔM elements; in fp32 4 bytes each.
    delta_m = int(HIDDEN * 4.0) - int(HIDDEN * 2.0)
    fp32 = _block_bytes(4.0, BATCH, None) - _block_bytes(2.0, BATCH, None)
    assert fp32 == 4 * BATCH * IMAGE_TOKENS * delta_m * 4
    # Under CUDA bf16 autocast the four are bf16 (2 bytes), and autocast's bf16 copies of the three
    # weights (gate, up: H × M; down: M × H) are kept for the backward too.
    bf16 = _block_bytes(4.0, BATCH, torch.bfloat16) - _block_bytes(2.0, BATCH, torch.bfloat16)
    assert bf16 == 4 * BATCH * IMAGE_TOKENS * delta_m * 2 + 3 * HIDDEN * delta_m * 2


def test_block_activations_grow_linearly_with_the_batch() -> None:
    one, two, three = (_block_bytes(2.0, b, None) for b in (1, 2, 3))
    assert two - one == three - two > 0  # affine: per-sample tensors plus a few batch-free scalars
    assert abs(2 * one - two) <= 64  # ... and those scalars are a few bytes, no weight-sized term


def test_states_of_a_small_recipe_by_hand(tmp_path: Path) -> None:
    from prx_core.denoiser import build_model
    from prx_core.testing.fixtures import tiny_recipe

    recipe = tiny_recipe(tmp_path, {"precision": {"use": "bf16_mixed"}, "train": {"device": "cuda"}})
    n = sum(p.numel() for p in build_model(recipe.model, 384, torch.float32).parameters())  # MiniLM: 384-d
    estimate = estimate_recipe(recipe, world_size=1)
    assert estimate.parameters == n
    # bf16_mixed: fp32 weights and gradients, AdamW's two fp32 moments; DDP buckets are the gradients.
    assert (estimate.weights, estimate.gradients, estimate.optimizer, estimate.ddp_buckets) == (4 * n, 4 * n, 8 * n, 0)
    assert estimate.per_gpu_batch == 4 and estimate.ema == 0
    checkpointed = estimate_recipe(with_checkpointing(recipe, True), world_size=1)
    assert checkpointed.activations < estimate.activations
    assert estimate.total - checkpointed.total == estimate.activations - checkpointed.activations


def _gpu_recipes() -> list[Path]:
    return [p for p in sorted(RECIPES.rglob("*.toml")) if load(p, []).train.device == "cuda"]


def test_every_shipped_gpu_recipe_fits_80_gb() -> None:
    paths = _gpu_recipes()
    assert len(paths) > 20  # baseline, ablations, pixel 1024 and its ablations, speedrun
    too_big = {}
    for path in paths:
        estimate = estimate_recipe(load(path, []), world_size=8)
        if not estimate.fits(80.0):
            too_big[str(path.relative_to(RECIPES))] = round(estimate.total / GIB, 1)
    assert not too_big, f"over {80 - HEADROOM_GIB} GiB: {too_big}"


def test_pixel_1024_at_32_per_gpu_would_not_fit() -> None:
    # The negative control: the recipe's old default (32 images per GPU, no checkpointing).
    recipe = load(RECIPES / "pixel_1024.toml", ["train.micro_batch=32"])
    estimate = estimate_recipe(recipe, world_size=8)
    assert not estimate.fits(80.0)
    assert 5.0 < estimate.block_saved / GIB < 6.0  # ~5.5 GiB per block at 1024 + 256 tokens
    assert estimate_recipe(with_checkpointing(recipe, True), world_size=8).fits(80.0)


@pytest.mark.parametrize("policy", ["fp32", "bf16_weights"])
def test_other_policies_are_estimated(policy: str) -> None:
    recipe = load(RECIPES / "baseline.toml", [f"precision.use={policy}"])
    estimate = estimate_recipe(recipe, world_size=8)
    assert estimate.weights == estimate.parameters * (2 if policy == "bf16_weights" else 4)
