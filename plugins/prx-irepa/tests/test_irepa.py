"""iREPA: spatial normalisation, conv/attention projectors, loss value, routing rules, gradient reach."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import prx_irepa  # noqa: E402
from prx_irepa import IrepaConfig, check_router_span  # noqa: E402
from prx_irepa.alignment import (  # noqa: E402
    AttentionProjector,
    ConvProjector,
    RoutingUnsupportedError,
    build_projector,
    irepa_loss,
    irepa_targets,
    spatial_normalise,
)

from prx_core.config import RecipeError, bind  # noqa: E402
from prx_core.context import StepContext  # noqa: E402
from prx_core.keys import CAPTURED_FEATURES, ROUTE_PLAN, RoutePlan, Stash  # noqa: E402
from prx_core.testing.fixtures import make_trainer, step_context, tiny_recipe  # noqa: E402
from prx_core.trainer import Trainer  # noqa: E402
from prx_core.vision import FrozenEncoder, load_frozen_encoder, write_random_weights  # noqa: E402

TINY_TEACHER = {"embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "tiny_dinov2.safetensors"
    return write_random_weights("dinov2_vitl14_reg", path, overrides=TINY_TEACHER)


@pytest.fixture(scope="module")
def teacher(weights: Path) -> FrozenEncoder:
    return load_frozen_encoder("dinov2_vitl14_reg", str(weights), overrides=TINY_TEACHER)


def _patch(weights: Path, **irepa: Any) -> dict[str, Any]:
    table = {
        "layer": 1,
        "projector_dim": 16,
        "projector_heads": 2,
        "weights": str(weights),
        "encoder_overrides": TINY_TEACHER,
        **irepa,
    }
    return {"model": {"depth": 3}, "plugins": {"irepa": table}}


def _loop_spatial_norm(targets_BNE: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.empty_like(targets_BNE, dtype=torch.float64)
    for b in range(targets_BNE.shape[0]):
        for e in range(targets_BNE.shape[2]):
            column = [float(v) for v in targets_BNE[b, :, e]]
            mean = sum(column) / len(column)
            std = (sum((v - mean) ** 2 for v in column) / len(column)) ** 0.5
            for n, v in enumerate(column):
                out[b, n, e] = (v - mean) / (std + eps)
    return out


def _loop_neg_cos(projected_BKE: torch.Tensor, targets_BKE: torch.Tensor) -> float:
    total, count = 0.0, 0
    for b in range(projected_BKE.shape[0]):
        for k in range(projected_BKE.shape[1]):
            u, v = projected_BKE[b, k].double(), targets_BKE[b, k].double()
            total += float(u @ v / (u.norm() * v.norm()))
            count += 1
    return -total / count


def _spy_loss_terms(trainer: Trainer) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    original = trainer._loss_terms

    def spy(ctx: StepContext) -> Any:
        terms = original(ctx)
        seen.update(ctx=ctx, terms=terms)
        return terms

    trainer._loss_terms = spy  # type: ignore[method-assign]
    return seen


# --------------------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    config = IrepaConfig()
    assert (config.weight, config.layer, config.projector, config.projector_dtype) == (0.5, 7, "conv", "compute")
    with pytest.raises(RecipeError, match="must be one of 'compute', 'param'"):
        bind(IrepaConfig, {"projector_dtype": "bf16"}, prefix="plugins.irepa")
    with pytest.raises(RecipeError, match="must be one of 'conv', 'attention'"):
        bind(IrepaConfig, {"projector": "mlp"}, prefix="plugins.irepa")
    with pytest.raises(RecipeError, match="not divisible by projector_heads"):
        bind(IrepaConfig, {"projector": "attention", "projector_dim": 10, "projector_heads": 4})
    with pytest.raises(RecipeError, match="layer must be >= 0"):
        bind(IrepaConfig, {"layer": -2})


# --------------------------------------------------------------------------- maths


def test_spatial_normalise_matches_a_loop() -> None:
    targets = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    out = spatial_normalise(targets)
    torch.testing.assert_close(out.double(), _loop_spatial_norm(targets), rtol=1e-5, atol=1e-5)
    assert out.mean(dim=1).abs().max() < 1e-5


def test_conv_projector_equals_explicit_convolutions_on_the_grid() -> None:
    projector = build_projector("conv", 8, 6, 2, 5)
    assert isinstance(projector, ConvProjector)
    tokens = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(1))  # a 3×4 grid
    image = torch.zeros(2, 8, 3, 4)
    for k in range(12):  # row-major, as diffusers' img2seq lays tokens out
        image[:, :, k // 4, k % 4] = tokens[:, k]
    hidden = F.silu(F.conv2d(image, projector.conv_in.weight, projector.conv_in.bias, padding=1))
    expected = F.conv2d(hidden, projector.conv_out.weight, projector.conv_out.bias)
    out = projector(tokens, (3, 4))
    assert out.shape == (2, 12, 5)
    for k in range(12):
        torch.testing.assert_close(out[:, k], expected[:, :, k // 4, k % 4])
    with pytest.raises(RoutingUnsupportedError, match="full 3×4 token grid"):
        projector(tokens[:, :7], (3, 4))


def test_attention_projector_handles_any_token_subset() -> None:
    projector = build_projector("attention", 8, 6, 2, 5)
    assert isinstance(projector, AttentionProjector)
    tokens = torch.randn(2, 7, 8)
    assert projector(tokens, (3, 4)).shape == (2, 7, 5)


def test_loss_matches_an_independent_computation(teacher: FrozenEncoder) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 24, generator=g)
    tokens = torch.randn(2, 24, 8, generator=g)
    for kind in ("conv", "attention"):
        projector = build_projector(kind, 8, 12, 2, teacher.embed_dim)
        value = irepa_loss(projector, tokens, teacher, images, images * 2 - 1, 4, plan=None, layer=0)
        with torch.no_grad():
            targets = _loop_spatial_norm(teacher.patch_tokens(images, (4, 6)))
            expected = _loop_neg_cos(projector(tokens, (4, 6)), targets)
        assert value.item() == pytest.approx(expected, abs=1e-5), kind


def test_targets_are_normalised_over_the_full_grid_then_gathered(teacher: FrozenEncoder) -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    full = spatial_normalise(teacher.patch_tokens(images, (4, 4)).detach())
    idx = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
    plan = RoutePlan(visible_idx_BK=idx, full_length=16, start=0, end=2)
    routed = irepa_targets(teacher, images, (4, 4), plan, layer=1)
    assert torch.equal(routed, torch.stack([full[b, idx[b]] for b in range(2)]))


def test_attention_projector_aligns_routed_tokens(teacher: FrozenEncoder) -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 16, generator=g)
    idx = torch.tensor([[0, 3, 5, 9, 12], [1, 2, 8, 14, 15]])
    plan = RoutePlan(visible_idx_BK=idx, full_length=16, start=0, end=2)
    tokens = torch.randn(2, 5, 8, generator=g)
    projector = build_projector("attention", 8, 8, 2, teacher.embed_dim)
    value = irepa_loss(projector, tokens, teacher, images, images, 4, plan=plan, layer=2)
    with torch.no_grad():
        full = _loop_spatial_norm(teacher.patch_tokens(images, (4, 4)))
        expected = _loop_neg_cos(projector(tokens, (4, 4)), torch.stack([full[b, idx[b]] for b in range(2)]))
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_conv_projector_refuses_a_route_plan_covering_the_layer(teacher: FrozenEncoder) -> None:
    images = torch.rand(2, 3, 16, 16)
    plan = RoutePlan(visible_idx_BK=torch.tensor([[0, 1], [2, 3]]), full_length=16, start=1, end=2)
    projector = build_projector("conv", 8, 8, 2, teacher.embed_dim)
    with pytest.raises(RoutingUnsupportedError, match='use projector = "attention"'):
        irepa_loss(projector, torch.randn(2, 2, 8), teacher, images, images, 4, plan=plan, layer=1)
    # A plan that does not cover the layer is fine: the block saw every token.
    value = irepa_loss(projector, torch.randn(2, 16, 8), teacher, images, images, 4, plan=plan, layer=0)
    assert torch.isfinite(value)


def test_router_span_check_at_setup() -> None:
    router = SimpleNamespace(start=2, end=5)
    with pytest.raises(RecipeError, match=r"inside the token router's span \(blocks 2\.\.5\)"):
        check_router_span(router, 3, "conv")
    check_router_span(router, 3, "attention")
    check_router_span(router, 6, "conv")
    check_router_span(None, 3, "conv")


# --------------------------------------------------------------------------- in the trainer


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_term_and_gradient_reach_in_a_training_step(kind: str, weights: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, projector=kind)), tmp_path / "run")
    trainable = trainer.run.trainable
    assert isinstance(trainable.extras["irepa"], ConvProjector if kind == "conv" else AttentionProjector)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off the zero inits, so a zero gate cannot hide a missing gradient
        for p in trainable.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    seen = _spy_loss_terms(trainer)
    trainer.micro_step(0, 0)
    (term,) = seen["terms"]
    assert (term.name, term.weight) == ("irepa", 0.5)
    ctx = seen["ctx"]
    tokens = ctx.stash[CAPTURED_FEATURES][1]
    teacher = prx_irepa.loaded_teacher(trainer.run)
    with torch.no_grad():
        targets = _loop_spatial_norm(teacher.patch_tokens(ctx.images_BCHW, (4, 4)))
        expected = _loop_neg_cos(trainable.extras["irepa"](tokens, (4, 4)), targets)
    assert term.value.item() == pytest.approx(expected, abs=1e-5)

    trainable.zero_grad(set_to_none=True)
    term.value.backward()
    prefixes = (
        "extras.irepa.",
        "model.img_in.",
        "model.txt_in.",
        "model.time_in.",
        "model.blocks.0.",
        "model.blocks.1.",
    )
    for name, p in trainable.named_parameters():
        if name.startswith(prefixes):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
        else:
            assert p.grad is None, f"{name} gets a gradient from the iREPA term"
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert all(k.startswith(("model.", "extras.irepa.")) for k in trainable.state_dict())


def test_hook_refuses_a_conv_projector_on_a_routed_layer(weights: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights)), tmp_path / "run")
    images = torch.rand(2, 3, 16, 16)
    stash = Stash()
    stash[CAPTURED_FEATURES] = {1: torch.randn(2, 4, 32)}
    stash[ROUTE_PLAN] = RoutePlan(visible_idx_BK=torch.tensor([[0, 1, 2, 3]] * 2), full_length=16, start=0, end=2)
    step = step_context(trainer.run, torch.zeros_like(images), images, stash, generator=torch.Generator())
    with pytest.raises(RoutingUnsupportedError, match="conv projector needs the full token grid"):
        prx_irepa.prx_loss_terms(step)


def test_layer_beyond_the_model_is_refused_by_the_recipe_check(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"'plugins\.irepa\.layer' is 5, but model\.depth = 3 has blocks 0\.\.2"):
        make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, layer=5)), tmp_path / "run")


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_one_step_under_bf16_mixed(kind: str, weights: Path, tmp_path: Path) -> None:
    patch = _patch(weights, projector=kind)
    patch["precision"] = {"use": "bf16_mixed"}
    trainer = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    teacher = prx_irepa.loaded_teacher(trainer.run)
    assert {p.dtype for p in teacher.model.parameters()} == {trainer.run.precision.frozen_dtype}
    # The projector is stored in the compute dtype (bf16), as the reference's (reference.md §8);
    # the guard accepted it at setup because it is declared.
    projector = trainer.run.require("trainable").extras["irepa"]
    assert {p.dtype for p in projector.parameters()} == {torch.bfloat16}
    loss, terms, grad_norm = trainer.train_step(0)
    assert bool(loss.isfinite()) and bool(terms["irepa"].isfinite()) and bool(grad_norm.isfinite())
    trainer.optimizer.step()
    trainer.run.require("precision").check(trainer.run.require("trainable"), trainer.optimizer, "after a step")


def test_teacher_input_is_the_references_nearest_resize(teacher: FrozenEncoder) -> None:
    """reference.md §8: iREPA's teacher input is resized like REPA's, nearest by scale factor. At
    16 × 16 px with a 4 × 4 grid and a /14 teacher the factor is 3.5: output pixel i takes input
    pixel floor(i / 3.5) = 2i // 7."""
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    index = torch.tensor([2 * i // 7 for i in range(56)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    selected = ((images - mean) / std)[:, :, index][:, :, :, index]
    with torch.no_grad():
        expected = _loop_spatial_norm(teacher.model.forward_features(selected)[:, teacher.num_prefix_tokens :])
        targets = irepa_targets(teacher, images, (4, 4), None, layer=0)
    torch.testing.assert_close(targets.double(), expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- precomputed targets


def _step(run: Any, images: torch.Tensor | None, x0: torch.Tensor, stash: Stash, **extra: Any) -> Any:
    return step_context(run, x0, images, stash, **extra)


@pytest.mark.parametrize("kind", ["conv", "attention"])
def test_loss_from_precomputed_features_equals_the_online_loss(kind: str, weights: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, projector=kind)), tmp_path / "run")
    run = trainer.run
    g = torch.Generator().manual_seed(6)
    images = torch.rand(3, 3, 16, 16, generator=g)
    x0 = images * 2 - 1
    stash = Stash()
    if kind == "attention":  # routed: the stored full-grid targets are gathered like the online ones
        idx = torch.stack([torch.randperm(16, generator=g)[:9].sort().values for _ in range(3)])
        stash[ROUTE_PLAN] = RoutePlan(visible_idx_BK=idx, full_length=16, start=1, end=2)
        stash[CAPTURED_FEATURES] = {1: torch.randn(3, 9, 32, generator=g)}
    else:
        stash[CAPTURED_FEATURES] = {1: torch.randn(3, 16, 32, generator=g)}
    features = prx_irepa.prx_precompute_features(run=run, images_BCHW=images)
    assert set(features) == {"irepa:dinov2_vitl14_reg:4x4"}
    teacher = prx_irepa.loaded_teacher(run)
    with torch.no_grad():  # stored targets are the normalised ones, over the full grid
        expected = spatial_normalise(teacher.patch_tokens(images, (4, 4)))
    assert torch.equal(features["irepa:dinov2_vitl14_reg:4x4"], expected)
    (online,) = prx_irepa.prx_loss_terms(_step(run, images, x0, stash))
    (stored,) = prx_irepa.prx_loss_terms(_step(run, None, x0, stash, precomputed=features))
    assert torch.equal(stored.value, online.value)
    with pytest.raises(RuntimeError, match="no images and no precomputed teacher targets"):
        prx_irepa.prx_loss_terms(_step(run, None, x0, stash))


def test_stored_targets_spare_the_teacher(weights: Path) -> None:
    plugins = {"irepa": bind(IrepaConfig, {"layer": 0, "weights": str(weights)})}
    stored = {"irepa:dinov2_vitl14_reg:4x4": (16, 32), "repa:dinov2_vitl14_reg:4x4": (16, 64)}
    run = SimpleNamespace(data=SimpleNamespace(precomputed_features=stored), plugin_config=plugins.__getitem__)
    assert prx_irepa.precomputed_width(run) == 32  # type: ignore[arg-type]
    run.data = SimpleNamespace()
    assert prx_irepa.precomputed_width(run) is None  # type: ignore[arg-type]
