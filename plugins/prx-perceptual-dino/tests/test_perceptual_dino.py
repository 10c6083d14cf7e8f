"""Perceptual DINO: loss value, gradient path through the frozen encoder, requirement checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import prx_perceptual_dino  # noqa: E402
from prx_perceptual_dino import PerceptualDinoConfig  # noqa: E402
from prx_perceptual_dino.loss import perceptual_dino_loss  # noqa: E402

from prx_core.builtins.pixel import PixelSpace  # noqa: E402
from prx_core.config import RecipeError, bind  # noqa: E402
from prx_core.context import RunContext  # noqa: E402
from prx_core.keys import X0_PREDICTION, Stash  # noqa: E402
from prx_core.precision import Fp32  # noqa: E402
from prx_core.recipe import load  # noqa: E402
from prx_core.testing.fixtures import step_context, tiny_recipe, write_recipe  # noqa: E402
from prx_core.vision import FrozenEncoder, load_frozen_encoder, write_random_weights  # noqa: E402

TINY_ENCODER = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("encoder") / "tiny_dinov2_b.safetensors"
    return write_random_weights("dinov2_vitb14_reg", path, overrides=TINY_ENCODER)


@pytest.fixture(scope="module")
def encoder(weights: Path) -> FrozenEncoder:
    return load_frozen_encoder("dinov2_vitb14_reg", str(weights), overrides=TINY_ENCODER)


def _independent(encoder: FrozenEncoder, pred: torch.Tensor, target: torch.Tensor, resolution: int) -> float:
    """The reference's order on pixel latents in [−1, 1]: bilinear resize to resolution² (no
    antialiasing), then ((x + 1) / 2).clamp(0, 1), ImageNet-normalise, run the ViT, drop 5 prefix
    tokens, loop over tokens."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def tokens(latents: torch.Tensor) -> torch.Tensor:
        resized = F.interpolate(latents.float(), size=(resolution, resolution), mode="bilinear", align_corners=False)
        images = ((resized + 1.0) / 2.0).clamp(0.0, 1.0)
        return encoder.model.forward_features((images - mean) / std)[:, 5:]

    with torch.no_grad():
        a, b = tokens(pred).double(), tokens(target).double()
    per_sample = []
    for i in range(a.shape[0]):
        distances = [1.0 - float(a[i, k] @ b[i, k] / (a[i, k].norm() * b[i, k].norm())) for k in range(a.shape[1])]
        per_sample.append(sum(distances) / len(distances))
    return sum(per_sample) / len(per_sample)


DECODE = PixelSpace().decode  # ((x + 1) / 2).clamp(0, 1): the pixel latent space the plugin requires


def _run_with_plugin(tmp_path: Path, table: dict[str, Any]) -> RunContext:
    """A run whose recipe enables perceptual_dino, without depending on the x_prediction plugin.

    The recipe is loaded without the plugin (it would be rejected for lacking x-prediction) and
    the validated plugin config is added afterwards; enough to drive the hooks directly.
    """
    recipe = tiny_recipe(tmp_path / "recipe")
    recipe.plugins["perceptual_dino"] = bind(PerceptualDinoConfig, table, prefix="plugins.perceptual_dino")
    run = RunContext(recipe=recipe, device=torch.device("cpu"), run_dir=tmp_path / "run")
    run.precision = Fp32()
    run.latent_space = PixelSpace()
    return run


# --------------------------------------------------------------------------- config and checks


def test_config_defaults_follow_the_spec() -> None:
    config = PerceptualDinoConfig()
    assert (config.weight, config.encoder, config.resolution) == (0.01, "dinov2_vitb14_reg", 224)
    info = prx_perceptual_dino.INFO
    assert info.config is PerceptualDinoConfig
    assert set(info.requires) == {"objective:x_prediction", "latent_space:pixel"}
    with pytest.raises(RecipeError, match="resolution must be >= 1"):
        bind(PerceptualDinoConfig, {"resolution": 0})
    with pytest.raises(RecipeError, match="weight must be >= 0"):
        bind(PerceptualDinoConfig, {"weight": -0.1})


def test_recipe_check_rejects_the_velocity_objective(tmp_path: Path) -> None:
    """reference.md §7.3: the reference crashed at start-up; here the recipe check names what is missing."""
    path = write_recipe(tmp_path, {"plugins": {"perceptual_dino": {}}})
    with pytest.raises(RecipeError, match="requires objective:x_prediction"):
        load(path)


def test_resolution_must_be_a_multiple_of_the_patch_size(weights: Path, tmp_path: Path) -> None:
    run = _run_with_plugin(tmp_path, {"weights": str(weights), "encoder_overrides": TINY_ENCODER, "resolution": 100})
    with pytest.raises(RecipeError, match="not a multiple of the encoder's patch size 14"):
        prx_perceptual_dino.prx_configure(run)


# --------------------------------------------------------------------------- maths


def test_loss_matches_an_independent_computation(encoder: FrozenEncoder) -> None:
    g = torch.Generator().manual_seed(0)
    # Latents reaching past [−1, 1], as an x̂0 can: the clamp after the resize matters.
    pred, target = torch.randn(3, 3, 16, 24, generator=g) * 1.5, torch.rand(3, 3, 16, 24, generator=g) * 2 - 1
    value = perceptual_dino_loss(encoder, DECODE, pred, target, 224)
    assert value.item() == pytest.approx(_independent(encoder, pred, target, 224), abs=1e-5)
    assert perceptual_dino_loss(encoder, DECODE, target, target, 56).item() == pytest.approx(0.0, abs=1e-6)


def test_resize_comes_before_the_clamp_so_overshooting_pixels_get_gradient(encoder: FrozenEncoder) -> None:
    """reference.md §8: resize, then clamp. At 28 → 14 px (bilinear ×0.5: 2×2 block means) an x̂0
    pixel at 1.5 among zeros becomes 0.375 after the resize, inside the clamp, so it gets a
    gradient; a whole 2×2 block at 1.5 stays 1.5, is clamped, and gets none. Clamping first (the
    old order) would cut the gradient of both."""
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(1, 3, 28, 28, generator=g) * 0.5 - 0.25
    pred[0, :, 4, 4] = 1.5  # alone in its block (rows 4-5, columns 4-5): the rest of the block is < 0.25
    pred[0, :, 10:12, 10:12] = 1.5  # a whole block above 1
    pred.requires_grad_(True)
    target = torch.rand(1, 3, 28, 28, generator=g) * 2 - 1
    perceptual_dino_loss(encoder, DECODE, pred, target, 14).backward()
    assert pred.grad is not None
    assert (pred.grad[0, :, 4, 4] != 0).all()  # x̂0 > 1, yet a gradient
    assert (pred.grad[0, :, 10:12, 10:12] == 0).all()  # resized value > 1: clamped
    assert (pred.grad[0, :, 5, 5] != 0).all()  # an ordinary pixel of the first block


def test_gradient_reaches_the_prediction_and_its_model_but_not_the_encoder(encoder: FrozenEncoder) -> None:
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Conv2d(3, 3, 1)
    inputs, target = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    pred = torch.tanh(model(inputs))
    pred.retain_grad()
    target.requires_grad_(True)  # the target side must not take part in the graph
    perceptual_dino_loss(encoder, DECODE, pred, target, 28).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None and not p.requires_grad for p in encoder.model.parameters())


def test_a_bf16_prediction_is_resized_in_fp32_and_keeps_its_gradient(encoder: FrozenEncoder) -> None:
    """Under autocast x̂0 is bf16; the resize runs in fp32 (the cast is differentiable)."""
    pred = (torch.rand(1, 3, 16, 16) * 2 - 1).bfloat16().requires_grad_(True)
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    value = perceptual_dino_loss(encoder, DECODE, pred, target, 28)
    assert value.dtype == torch.float32
    value.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16 and pred.grad.abs().sum() > 0


def test_resolution_sets_the_token_grid(encoder: FrozenEncoder) -> None:
    seen: list[tuple[tuple[int, int], tuple[int, ...]]] = []
    original = encoder.patch_tokens

    def spy(images: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        seen.append((grid_hw, tuple(images.shape[-2:])))
        return original(images, grid_hw)

    encoder.patch_tokens = spy  # type: ignore[method-assign]
    try:
        perceptual_dino_loss(encoder, DECODE, torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), 224)
    finally:
        del encoder.patch_tokens
    # 224 px with /14 patches (reference.md §4); the images reach the encoder already resized.
    assert seen == [((16, 16), (224, 224)), ((16, 16), (224, 224))]


# --------------------------------------------------------------------------- hooks


def test_hook_reads_x0_prediction_and_decodes_pixel_latents(weights: Path, tmp_path: Path) -> None:
    run = _run_with_plugin(tmp_path, {"weights": str(weights), "encoder_overrides": TINY_ENCODER, "weight": 0.25})
    prx_perceptual_dino.prx_configure(run)
    encoder = prx_perceptual_dino.loaded_encoder(run)
    assert {p.dtype for p in encoder.model.parameters()} == {run.precision.frozen_dtype}
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 16, generator=g)
    x0 = images * 2 - 1
    head = torch.nn.Conv2d(3, 3, 1)
    x0_hat = torch.tanh(head(torch.randn(2, 3, 16, 16, generator=g)))  # pixel latents in (−1, 1)
    stash = Stash()
    stash[X0_PREDICTION] = x0_hat
    step = step_context(run, x0, images, stash, generator=g)
    (term,) = prx_perceptual_dino.prx_loss_terms(step)
    assert (term.name, term.weight) == ("perceptual_dino", 0.25)
    expected = _independent(encoder, x0_hat.detach(), x0, 224)
    assert term.value.item() == pytest.approx(expected, abs=1e-5)
    term.value.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
