"""REPA: projector, targets, loss value, gradient reach, route-plan gather, teacher kept out of checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import prx_repa  # noqa: E402
from prx_repa import RepaConfig  # noqa: E402
from prx_repa.alignment import build_projector, repa_loss, repa_targets  # noqa: E402

from prx_core.config import RecipeError, bind  # noqa: E402
from prx_core.context import StepContext  # noqa: E402
from prx_core.keys import CAPTURED_FEATURES, ROUTE_PLAN, RoutePlan, Stash  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, step_context, tiny_recipe  # noqa: E402
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


def _patch(weights: Path, **repa: Any) -> dict[str, Any]:
    table = {"layer": 1, "projector_dim": 16, "weights": str(weights), "encoder_overrides": TINY_TEACHER, **repa}
    return {"model": {"depth": 3}, "plugins": {"repa": table}}


def _loop_neg_cos(projected_BKE: torch.Tensor, targets_BKE: torch.Tensor) -> float:
    """−mean cosine similarity, one token at a time."""
    total, count = 0.0, 0
    for b in range(projected_BKE.shape[0]):
        for k in range(projected_BKE.shape[1]):
            u, v = projected_BKE[b, k].double(), targets_BKE[b, k].double()
            total += float(u @ v / (u.norm() * v.norm()))
            count += 1
    return -total / count


def _spy_loss_terms(trainer: Trainer) -> dict[str, Any]:
    """Keep the StepContext and the (undetached) loss terms of the next micro-step."""
    seen: dict[str, Any] = {}
    original = trainer._loss_terms

    def spy(ctx: StepContext) -> Any:
        terms = original(ctx)
        seen.update(ctx=ctx, terms=terms)
        return terms

    trainer._loss_terms = spy  # type: ignore[method-assign]
    return seen


# --------------------------------------------------------------------------- config


def test_config_defaults_follow_the_spec() -> None:
    config = RepaConfig()
    assert (config.weight, config.layer, config.encoder, config.projector_dim) == (0.5, 7, "dinov2_vitl14_reg", 1024)
    assert config.projector_dtype == "compute"
    assert prx_repa.INFO.config is RepaConfig


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"weight": -1.0}, "weight must be >= 0"),
        ({"layer": -1}, "layer must be >= 0"),
        ({"projector_dim": 0}, "projector_dim must be >= 1"),
        ({"encoder": " "}, "encoder must name a teacher"),
        ({"projector_dtype": "bfloat16"}, "projector_dtype' must be one of 'compute', 'param'"),
        ({"lambda": 0.5}, "unknown key"),
    ],
)
def test_config_rejects_bad_values(table: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        bind(RepaConfig, table, prefix="plugins.repa")


# --------------------------------------------------------------------------- maths


def test_projector_is_an_mlp_with_silu() -> None:
    projector = build_projector(32, 16, 24)
    layers = list(projector)
    assert [type(m).__name__ for m in layers] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, torch.nn.Linear)] == [
        (32, 16),
        (16, 16),
        (16, 24),
    ]


def test_projector_init_is_the_same_in_two_runs_of_one_recipe(weights: Path, tmp_path: Path) -> None:
    """Plain init, made deterministic by core's per-plugin seeding of prx_build_modules."""
    first = make_trainer(tiny_recipe(tmp_path / "a", _patch(weights)), tmp_path / "run_a")
    torch.manual_seed(12345)  # whatever the global generator did in between
    second = make_trainer(tiny_recipe(tmp_path / "b", _patch(weights)), tmp_path / "run_b")
    a, b = first.run.trainable.extras["repa"], second.run.trainable.extras["repa"]
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_loss_matches_a_token_by_token_computation(teacher: FrozenEncoder) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 24, generator=g)
    x0 = images * 2 - 1  # pixel latents: 16×24 with patch 4 → a 4×6 token grid
    tokens = torch.randn(2, 24, 8, generator=g)
    projector = build_projector(8, 12, teacher.embed_dim)
    value = repa_loss(projector, tokens, teacher, images, x0, 4, plan=None, layer=0)
    with torch.no_grad():
        targets = teacher.patch_tokens(images, (4, 6))
        expected = _loop_neg_cos(projector(tokens), targets)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_teacher_input_is_the_references_nearest_resize(teacher: FrozenEncoder) -> None:
    """reference.md §8: the reference resizes the teacher's input with F.interpolate(scale_factor=
    patch / √(H·W / N)) in its default nearest mode. Written out as index selection: 16 × 24-px
    images with a 4 × 6 token grid (4-px tokens) and a /14 teacher give a factor of 3.5, so output
    pixel i takes input pixel floor(i / 3.5) = 2i // 7, along both axes."""
    g = torch.Generator().manual_seed(7)
    images = torch.rand(2, 3, 16, 24, generator=g)
    seen: list[torch.Tensor] = []
    model = teacher.model
    original = model.forward_features

    def spy(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return original(x)

    model.forward_features = spy  # type: ignore[method-assign]
    try:
        targets = repa_targets(teacher, images, (4, 6), None, layer=0)
    finally:
        del model.forward_features
    rows = torch.tensor([2 * i // 7 for i in range(4 * 14)])
    cols = torch.tensor([2 * j // 7 for j in range(6 * 14)])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected_input = ((images - mean) / std)[:, :, rows][:, :, :, cols]
    (teacher_input,) = seen
    assert teacher_input.shape == (2, 3, 56, 84)
    torch.testing.assert_close(teacher_input, expected_input, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(targets, original(expected_input)[:, teacher.num_prefix_tokens :])


def test_targets_follow_a_route_plan_that_covers_the_layer(teacher: FrozenEncoder) -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    full = teacher.patch_tokens(images, (4, 4)).detach()
    idx = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 11]])
    plan = RoutePlan(visible_idx_BK=idx, full_length=16, start=1, end=2)
    routed = repa_targets(teacher, images, (4, 4), plan, layer=2)
    expected = torch.stack([torch.stack([full[b, int(i)] for i in idx[b]]) for b in range(2)])
    assert torch.equal(routed, expected)
    # Outside the routed span the block sees every token, so every target is kept.
    assert torch.equal(repa_targets(teacher, images, (4, 4), plan, layer=3), full)
    assert not repa_targets(teacher, images, (4, 4), plan, layer=3).requires_grad


def test_loss_refuses_mismatched_token_counts(teacher: FrozenEncoder) -> None:
    images = torch.rand(1, 3, 16, 16)
    projector = build_projector(8, 8, teacher.embed_dim)
    with pytest.raises(RuntimeError, match="does not match"):
        repa_loss(projector, torch.randn(1, 10, 8), teacher, images, images, 4, plan=None, layer=0)


# --------------------------------------------------------------------------- in the trainer


def test_term_in_a_training_step_matches_an_independent_computation(weights: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights)), tmp_path / "run")
    seen = _spy_loss_terms(trainer)
    trainer.micro_step(0, 0)
    (term,) = seen["terms"]
    assert (term.name, term.weight) == ("repa", 0.5)
    ctx = seen["ctx"]
    tokens = ctx.stash[CAPTURED_FEATURES][1]
    assert tokens.shape == (4, 16, 32)  # 16-px images, patch 4: a 4×4 grid of width-32 tokens
    teacher = prx_repa.loaded_teacher(trainer.run)
    with torch.no_grad():
        targets = teacher.patch_tokens(ctx.images_BCHW, (4, 4))
        expected = _loop_neg_cos(trainer.run.trainable.extras["repa"](tokens), targets)
    assert term.value.item() == pytest.approx(expected, abs=1e-6)


def test_gradients_reach_the_projector_and_blocks_up_to_layer_only(weights: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, layer=1)), tmp_path / "run")
    trainable = trainer.run.trainable
    # Move every weight off its (partly zero) init, so a missing gradient cannot hide behind a
    # zero gate: PRX zero-initialises adaLN modulation and the final layer.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    seen = _spy_loss_terms(trainer)
    trainer.micro_step(0, 0)
    trainable.zero_grad(set_to_none=True)
    seen["terms"][0].value.backward()
    reached = {n for n, p in trainable.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    untouched = {n for n, p in trainable.named_parameters() if p.grad is None}
    expected_prefixes = ("extras.repa.", "model.img_in.", "model.txt_in.", "model.time_in.", "model.blocks.0.")
    expected_prefixes += ("model.blocks.1.",)
    for name, _ in trainable.named_parameters():
        if name.startswith(expected_prefixes):
            assert name in reached, f"{name} gets no gradient from the REPA term"
        else:
            assert name in untouched, f"{name} gets a gradient from the REPA term"
    assert any(n.startswith("model.blocks.2.") for n in untouched)
    assert any(n.startswith("model.final_layer.") for n in untouched)
    teacher = prx_repa.loaded_teacher(trainer.run)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


def test_teacher_is_not_trained_nor_checkpointed(weights: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights)), tmp_path / "run")
    keys = set(trainer.run.trainable.state_dict())
    assert {k.split(".")[1] for k in keys if k.startswith("extras.")} == {"repa"}
    assert all(k.startswith(("model.", "extras.repa.")) for k in keys)
    assert not trainer.plugin_states()
    teacher = prx_repa.loaded_teacher(trainer.run)
    teacher_ids = {id(p) for p in teacher.model.parameters()}
    assert not teacher_ids & {id(p) for p in trainer.run.trainable.parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_ids & optimised


def test_route_plan_in_the_stash_selects_visible_targets(weights: Path, tmp_path: Path) -> None:
    """What TREAD + REPA see: block `layer` inside the routed span holds only the visible tokens."""
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, layer=1)), tmp_path / "run")
    run = trainer.run
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 16, 16, generator=g)
    x0 = images * 2 - 1
    idx = torch.stack([torch.randperm(16, generator=g)[:7].sort().values for _ in range(2)])
    tokens = torch.randn(2, 7, 32, generator=g)
    stash = Stash()
    stash[CAPTURED_FEATURES] = {1: tokens}
    stash[ROUTE_PLAN] = RoutePlan(visible_idx_BK=idx, full_length=16, start=1, end=2)
    step = step_context(run, x0, images, stash, generator=g)
    (term,) = prx_repa.prx_loss_terms(step)
    teacher = prx_repa.loaded_teacher(run)
    with torch.no_grad():
        full = teacher.patch_tokens(images, (4, 4))
        gathered = torch.stack([full[b, idx[b]] for b in range(2)])
        expected = _loop_neg_cos(run.trainable.extras["repa"](tokens), gathered)
    assert term.value.item() == pytest.approx(expected, abs=1e-6)


def test_layer_beyond_the_model_is_refused_by_the_recipe_check(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"'plugins\.repa\.layer' is 3, but model\.depth = 3 has blocks 0\.\.2"):
        make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, layer=3)), tmp_path / "run")


def test_dinov3_teacher_under_bf16_mixed(tmp_path: Path) -> None:
    overrides = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    weights = write_random_weights("dinov3_vitl16", tmp_path / "tiny_dinov3.safetensors", overrides=overrides)
    patch = _patch(weights, encoder="dinov3_vitl16", encoder_overrides=overrides)
    patch["precision"] = {"use": "bf16_mixed"}
    trainer = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    teacher = prx_repa.loaded_teacher(trainer.run)
    assert teacher.patch_size == 16
    assert {p.dtype for p in teacher.model.parameters()} == {trainer.run.precision.frozen_dtype}
    losses = run_steps(trainer, 1)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_projector_is_stored_in_bf16_under_bf16_mixed_as_declared(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """reference.md §8: the reference keeps its REPA projector in bf16 (weights stored in bf16, the
    computation under bf16 autocast). Under bf16_mixed the projector is bf16 and declared to the
    precision guard, the rest of the model stays fp32, the optimizer state fp32; a step, a save and
    a resume all pass the guard, and the guard refuses the projector if anything casts it back."""
    from prx_core.precision import PrecisionError

    patch = _patch(weights)
    patch["precision"] = {"use": "bf16_mixed"}
    with caplog.at_level("INFO", logger="prx"):
        trainer = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    assert "plugin 'repa' stores its module's weights in torch.bfloat16, not in torch.float32" in caplog.text
    trainable = trainer.run.require("trainable")
    projector = trainable.extras["repa"]
    assert {p.dtype for p in projector.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainable.model.parameters()} == {torch.float32}
    run_steps(trainer, 1)
    assert {p.grad.dtype for p in projector.parameters() if p.grad is not None} <= {torch.bfloat16}
    states = [trainer.optimizer.state[p] for p in projector.parameters()]
    assert all(v.dtype == torch.float32 for st in states for v in st.values() if isinstance(v, torch.Tensor))
    trainer.save()
    resumed = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run", resume="auto")  # the guard runs
    assert {p.dtype for p in resumed.run.require("trainable").extras["repa"].parameters()} == {torch.bfloat16}
    projector.float()  # something casts the declared module behind the plugin's back
    with pytest.raises(PrecisionError, match=r"plugin 'repa' declared module 'extras\.repa' stored in torch\.bfloat16"):
        trainer.run.require("precision").check(trainable, trainer.optimizer, "after resume")


def test_projector_dtype_param_keeps_the_policys_weight_dtype(weights: Path, tmp_path: Path) -> None:
    patch = _patch(weights, projector_dtype="param")
    patch["precision"] = {"use": "bf16_mixed"}
    trainer = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    assert {p.dtype for p in trainer.run.require("trainable").extras["repa"].parameters()} == {torch.float32}
    # Under fp32 the compute dtype is fp32: nothing to declare, the projector is fp32 either way.
    fp32 = make_trainer(tiny_recipe(tmp_path / "f", _patch(weights)), tmp_path / "run_f")
    assert {p.dtype for p in fp32.run.require("trainable").extras["repa"].parameters()} == {torch.float32}


# --------------------------------------------------------------------------- precomputed targets


def _step(run: Any, images: torch.Tensor | None, x0: torch.Tensor, stash: Stash, **extra: Any) -> Any:
    return step_context(run, x0, images, stash, **extra)


@pytest.mark.parametrize("routed", [False, True])
def test_loss_from_precomputed_features_equals_the_online_loss(weights: Path, tmp_path: Path, routed: bool) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", _patch(weights, layer=1)), tmp_path / "run")
    run = trainer.run
    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 16, 16, generator=g)
    x0 = images * 2 - 1  # pixel space: latents at image size, patch 4 -> a 4×4 grid
    stash = Stash()
    if routed:
        idx = torch.stack([torch.randperm(16, generator=g)[:9].sort().values for _ in range(3)])
        stash[ROUTE_PLAN] = RoutePlan(visible_idx_BK=idx, full_length=16, start=1, end=2)
        stash[CAPTURED_FEATURES] = {1: torch.randn(3, 9, 32, generator=g)}
    else:
        stash[CAPTURED_FEATURES] = {1: torch.randn(3, 16, 32, generator=g)}
    features = prx_repa.prx_precompute_features(run=run, images_BCHW=images)
    assert set(features) == {"repa:dinov2_vitl14_reg:4x4"}
    assert features["repa:dinov2_vitl14_reg:4x4"].shape == (3, 16, 32)
    (online,) = prx_repa.prx_loss_terms(_step(run, images, x0, stash))
    # As training from shards sees it: no pixels, the stored targets (as the trainer hands them over).
    (stored,) = prx_repa.prx_loss_terms(_step(run, None, x0, stash, precomputed=features))
    assert torch.equal(stored.value, online.value)
    with pytest.raises(RuntimeError, match="no images and no precomputed teacher targets for a 4x4"):
        prx_repa.prx_loss_terms(
            _step(
                run, None, x0, stash, precomputed={"repa:dinov2_vitl14_reg:8x8": features["repa:dinov2_vitl14_reg:4x4"]}
            )
        )


def test_stored_tokens_spare_the_teacher(weights: Path) -> None:
    from types import SimpleNamespace

    recipe_plugins = {"repa": bind(RepaConfig, {"layer": 0, "weights": str(weights)})}
    stored = {"repa:dinov2_vitl14_reg:4x4": (16, 32), "irepa:dinov2_vitl14_reg:4x4": (16, 64)}
    run = SimpleNamespace(data=SimpleNamespace(precomputed_features=stored), plugin_config=recipe_plugins.__getitem__)
    assert prx_repa.precomputed_width(run) == 32  # type: ignore[arg-type]
    run.data.precomputed_features = {"repa:dinov3_vitl16:4x4": (16, 32)}  # another teacher's tokens
    assert prx_repa.precomputed_width(run) is None  # type: ignore[arg-type]
    run.data = SimpleNamespace()  # a pixel data source
    assert prx_repa.precomputed_width(run) is None  # type: ignore[arg-type]
