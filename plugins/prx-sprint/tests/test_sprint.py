"""Tests for the ``sprint`` router: fusion maths by hand, the block loop, seeding, EMA sampling."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from prx_sprint import SprintConfig  # noqa: E402
from prx_sprint.fusion import SprintFusion  # noqa: E402
from prx_sprint.router import SprintRouter  # noqa: E402

from prx_core import hookimpl  # noqa: E402
from prx_core.config import RecipeError  # noqa: E402
from prx_core.context import ForwardContext, StepContext  # noqa: E402
from prx_core.denoiser import build_model, denoise  # noqa: E402
from prx_core.keys import ROUTE_PLAN, RoutePlan, Stash  # noqa: E402
from prx_core.plugins import installed_plugins  # noqa: E402
from prx_core.recipe import ModelConfig, deep_merge  # noqa: E402
from prx_core.routing import choose_visible, gather_rope, scatter_tokens, visible_count  # noqa: E402
from prx_core.seeding import generator_for  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe  # noqa: E402
from prx_core.trainer import Trainer  # noqa: E402

#: 8×8 px, patch 2 → 16 image tokens; 3 blocks so a span 1..1 has a block on each side.
TINY = ModelConfig(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, axes_dim=(8, 8), depth=3)


def _model() -> torch.nn.Module:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x_BCHW = torch.randn(batch, 3, 8, 8, generator=gen)
    t_B = torch.rand(batch, generator=gen)
    text_BLD = torch.randn(batch, 5, 12, generator=gen)
    mask_BL = torch.ones(batch, 5, dtype=torch.bool)
    mask_BL[0, 3:] = False
    return x_BCHW, t_B, text_BLD, mask_BL


def _router(**overrides: Any) -> SprintRouter:
    return SprintRouter(SprintConfig(**{"start": 1, "end": 1, **overrides}), seed=0)


def _ctx(training: bool, extras: dict[str, torch.nn.Module]) -> ForwardContext:
    generator = torch.Generator().manual_seed(5) if training else None
    return ForwardContext(stash=Stash(), generator=generator, training=training, extras=extras)


# --------------------------------------------------------------------------- fusion maths


def test_fusion_matches_a_hand_computed_example() -> None:
    # H = 1, so fuse([d ; f]) = a·d + b·f with fuse.weight = [[a, b]].
    fusion = SprintFusion(1)
    with torch.no_grad():
        fusion.fuse.weight.copy_(torch.tensor([[2.0, 0.5]]))
        fusion.mask_token.fill_(-5.0)
    dense_BNH = torch.tensor([[[1.0], [2.0], [3.0]]])
    sparse_BKH = torch.tensor([[[10.0], [30.0]]])
    out = fusion(dense_BNH, sparse_BKH, torch.tensor([[0, 2]]))
    # Position 1 was routed: it gets the mask token, −5. 2·1 + 0.5·10, 2·2 + 0.5·(−5), 2·3 + 0.5·30.
    assert torch.equal(out, torch.tensor([[[7.0], [1.5], [21.0]]]))
    out.sum().backward()
    assert fusion.mask_token.grad is not None
    assert torch.equal(fusion.mask_token.grad, torch.tensor([0.5]))  # b × one routed position


def test_fusion_starts_as_the_span_output_without_routing() -> None:
    fusion = SprintFusion(4)
    assert torch.equal(fusion.fuse.weight, torch.cat([torch.zeros(4, 4), torch.eye(4)], dim=1))
    assert torch.equal(fusion.mask_token, torch.zeros(4))
    dense, sparse = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    assert torch.equal(fusion(dense, sparse, None), sparse)
    # With a route, routed positions start at the (zero) mask token, visible ones at the span output.
    idx = torch.tensor([[1, 3], [0, 4]])
    routed = fusion(dense, sparse[:, :2], idx)
    assert torch.equal(routed, scatter_tokens(torch.zeros(2, 5, 4), sparse[:, :2], idx))


def test_route_maths_copy_matches_hand_values() -> None:
    # This package carries its own copy of the route maths (plugins never import each other).
    assert [visible_count(16, 0.75), visible_count(10, 0.7), visible_count(100, 0.29)] == [4, 3, 71]
    idx = choose_visible(3, 16, 0.75, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 4) and all(r == sorted(set(r)) for r in idx.tolist())
    rope = torch.randn(3, 1, 16, 2, 2, 2)
    assert torch.equal(gather_rope(rope, idx), torch.stack([rope[b, :, idx[b]] for b in range(3)]))


# --------------------------------------------------------------------------- the block loop


def _run(router: SprintRouter, training: bool, fusion: SprintFusion) -> tuple[torch.Tensor, list[int], ForwardContext]:
    model = _model()
    x, t, text, mask = _inputs()
    seen: list[int] = []
    handle = model.blocks[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].shape[1]) or None, with_kwargs=True
    )
    ctx = _ctx(training, {"sprint": fusion})
    try:
        with torch.no_grad():
            out = denoise(model, x, t, text, mask, ctx, router=router)
    finally:
        handle.remove()
    return out, seen, ctx


def test_training_routes_the_span_and_fuses_with_the_dense_input() -> None:
    fusion = SprintFusion(32)
    with torch.no_grad():
        fusion.fuse.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = fusion.register_forward_hook(lambda m, args, out: calls.append((args[0], args[1])))
    try:
        _, seen, ctx = _run(_router(), training=True, fusion=fusion)
    finally:
        handle.remove()
    assert seen == [4]  # ⌈(1 − 0.75)·16⌉ tokens run through block 1
    plan = ctx.stash[ROUTE_PLAN]
    assert (plan.full_length, plan.start, plan.end, tuple(plan.visible_idx_BK.shape)) == (16, 1, 1, (3, 4))
    ((dense, sparse),) = calls
    assert dense.shape == (3, 16, 32) and sparse.shape == (3, 4, 32)


def test_evaluation_runs_every_token_and_still_fuses() -> None:
    fusion = SprintFusion(32)
    calls: list[int] = []
    handle = fusion.register_forward_hook(lambda m, args, out: calls.append(args[1].shape[1]))
    try:
        out, seen, ctx = _run(_router(), training=False, fusion=fusion)
    finally:
        handle.remove()
    assert seen == [16] and calls == [16]  # p = 0 at evaluation, fusion present
    assert ROUTE_PLAN not in ctx.stash
    # At init the fusion is [0 | I]: the whole forward equals the plain PRX forward.
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        plain = denoise(model, x, t, text, mask, _ctx(False, {}))
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_a_missing_fusion_module_is_a_clear_error() -> None:
    model = _model()
    x, t, text, mask = _inputs()
    with pytest.raises(RuntimeError, match="no 'sprint' fusion module in ctx.extras"), torch.no_grad():
        denoise(model, x, t, text, mask, _ctx(False, {}), router=_router())


# --------------------------------------------------------------------------- in the trainer


class _RouteSpy:
    def __init__(self) -> None:
        self.plans: dict[tuple[int, int], RoutePlan] = {}

    @hookimpl
    def prx_loss_terms(self, step: StepContext) -> None:
        self.plans[(step.step, step.micro_step)] = step.stash[ROUTE_PLAN]


def _trainer(tmp_path: Path, name: str, patch: dict[str, Any] | None = None) -> Trainer:
    base = {"router": {"use": "sprint", "start": 0, "end": 1}, "train": {"global_batch": 4, "micro_batch": 2}}
    return make_trainer(
        tiny_recipe(tmp_path / f"recipe-{name}", deep_merge(base, patch or {})), tmp_path / f"run-{name}"
    )


def test_routes_follow_the_core_keys_and_survive_recomputation(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "keys", {"train": {"activation_checkpointing": True}})
    spy = _RouteSpy()
    trainer.recipe.active.manager.register(spy, name="route-spy")
    inputs: list[torch.Tensor] = []
    block = trainer.run.require("trainable").model.blocks[1]
    handle = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()) or None)
    try:
        loss, _ = trainer.micro_step(0, 0)
        loss.backward()
    finally:
        handle.remove()
    assert len(inputs) == 2 and inputs[0].shape[1] == 4 and torch.equal(inputs[0], inputs[1])
    trainer.micro_step(0, 1)
    trainer.micro_step(1, 0)
    for (step, micro), plan in spy.plans.items():
        expected = choose_visible(2, 16, 0.75, generator_for(trainer.recipe.seed, "route", step, micro, 0))
        assert torch.equal(plan.visible_idx_BK, expected)
    assert not torch.equal(spy.plans[(0, 0)].visible_idx_BK, spy.plans[(0, 1)].visible_idx_BK)
    assert not torch.equal(spy.plans[(0, 0)].visible_idx_BK, spy.plans[(1, 0)].visible_idx_BK)


def test_fusion_is_trained_and_checkpointed_with_the_model(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train")
    trainable = trainer.run.require("trainable")
    fusion = trainable.extras["sprint"]
    assert isinstance(fusion, SprintFusion)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(fusion.fuse.weight), id(fusion.mask_token)} <= optimised
    before = [p.detach().clone() for p in fusion.parameters()]
    run_steps(trainer, 1)
    assert all(not torch.equal(a, b) for a, b in zip(before, fusion.parameters(), strict=True))
    assert {"extras.sprint.fuse.weight", "extras.sprint.mask_token"} <= set(trainable.state_dict())
    info = trainer.save()
    assert info is not None
    parts, _ = trainer.checkpoints.load(info, device="cpu")
    assert torch.equal(parts["trainable"]["extras.sprint.mask_token"], fusion.mask_token.detach())


def _corrupt(fusion: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


@pytest.mark.skipif(
    "ema" not in installed_plugins(), reason="prx-ema is not installed (pip install -e plugins/prx-ema)"
)
def test_ema_sampling_runs_the_ema_copy_of_the_fusion(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "ema", {"plugins": {"ema": {"decay": 0.5, "every": 1}}})
    run_steps(trainer, 2)
    ema = trainer.sampling_modules()
    assert ema is not trainer.run.trainable and isinstance(ema.extras["sprint"], SprintFusion)

    def sample() -> torch.Tensor:
        return trainer.generate(["a red square"], steps=2, cfg=2.0, seed=0, size=16)

    reference = sample()
    _corrupt(trainer.run.trainable.extras["sprint"], 0)  # the trained fusion is not what samples
    assert torch.equal(sample(), reference)
    _corrupt(ema.extras["sprint"], 1)  # the EMA fusion is
    assert not torch.equal(sample(), reference)


def test_sampling_without_ema_runs_the_trained_fusion(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "plain")
    reference = trainer.generate(["a red square"], steps=2, cfg=2.0, seed=0, size=16)
    _corrupt(trainer.run.trainable.extras["sprint"], 0)
    assert not torch.equal(trainer.generate(["a red square"], steps=2, cfg=2.0, seed=0, size=16), reference)


def test_span_beyond_the_model_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"router\.end is 5, but the model has blocks 0\.\.1"):
        _trainer(tmp_path, "deep", {"router": {"end": 5}})


@pytest.mark.parametrize(
    ("table", "message"), [({"start": 3, "end": 2}, "start"), ({"start": -1}, "start"), ({"ratio": 1.0}, "ratio")]
)
def test_config_rejects_bad_values(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SprintConfig(**table)
