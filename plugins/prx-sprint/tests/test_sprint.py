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
    # H = 1, so fuse([d ; f]) = a·d + b·f + c with fuse.weight = [[a, b]] and fuse.bias = [c].
    fusion = SprintFusion(1)
    with torch.no_grad():
        fusion.fuse.weight.copy_(torch.tensor([[2.0, 0.5]]))
        fusion.fuse.bias.fill_(0.25)
        fusion.mask_token.fill_(-5.0)
    dense_BNH = torch.tensor([[[1.0], [2.0], [3.0]]])
    sparse_BKH = torch.tensor([[[10.0], [30.0]]])
    out = fusion(dense_BNH, sparse_BKH, torch.tensor([[0, 2]]))
    # Position 1 was routed: it gets the mask token, −5.
    # 2·1 + 0.5·10 + 0.25, 2·2 + 0.5·(−5) + 0.25, 2·3 + 0.5·30 + 0.25.
    assert torch.equal(out, torch.tensor([[[7.25], [1.75], [21.25]]]))
    out.sum().backward()
    assert fusion.mask_token.grad is not None
    assert torch.equal(fusion.mask_token.grad, torch.tensor([0.5]))  # b × one routed position
    assert fusion.fuse.bias.grad is not None and torch.equal(fusion.fuse.bias.grad, torch.tensor([3.0]))


def test_default_init_is_pytorchs_linear_with_a_bias_and_not_the_identity() -> None:
    # The public code's fusion: nn.Linear(2H, H, bias=True) at its default init (reference.md §8).
    hidden = 4
    torch.manual_seed(0)
    fusion = SprintFusion(hidden)
    weight, bias = fusion.fuse.weight.detach(), fusion.fuse.bias.detach()
    assert weight.shape == (hidden, 2 * hidden) and bias.shape == (hidden,)
    bound = 1 / (2 * hidden) ** 0.5  # PyTorch's default: U(±1/√fan_in) for both weight and bias
    assert weight.abs().max() <= bound and bias.abs().max() <= bound and bias.abs().min() > 0
    assert not torch.equal(weight, torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1))
    assert torch.equal(fusion.mask_token, torch.zeros(hidden))
    # Drawn from the global generator: the core seeds it around prx_build_modules, so init is reproducible.
    torch.manual_seed(0)
    assert torch.equal(SprintFusion(hidden).fuse.weight, weight)

    gen = torch.Generator().manual_seed(1)
    dense, sparse = torch.randn(2, 5, hidden, generator=gen), torch.randn(2, 5, hidden, generator=gen)
    with torch.no_grad():
        out = fusion(dense, sparse, None)
    # Written out: the concatenation [dense ; sparse] times W transposed, plus b.
    expected = torch.cat([dense, sparse], dim=-1) @ weight.T + bias
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, sparse)  # at init the fused output is not the span output


def test_identity_init_starts_as_the_span_output_without_routing() -> None:
    fusion = SprintFusion(4, init="identity")
    assert torch.equal(fusion.fuse.weight, torch.cat([torch.zeros(4, 4), torch.eye(4)], dim=1))
    assert torch.equal(fusion.fuse.bias, torch.zeros(4))
    assert torch.equal(fusion.mask_token, torch.zeros(4))
    dense, sparse = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    assert torch.equal(fusion(dense, sparse, None), sparse)
    # With a route, routed positions start at the (zero) mask token, visible ones at the span output.
    idx = torch.tensor([[1, 3], [0, 4]])
    routed = fusion(dense, sparse[:, :2], idx)
    assert torch.equal(routed, scatter_tokens(torch.zeros(2, 5, 4), sparse[:, :2], idx))
    with pytest.raises(ValueError, match="init must be one of"):
        SprintFusion(4, init="zeros")  # type: ignore[arg-type]


def test_route_count_is_the_shared_one() -> None:
    # The count lives in prx_core.routing (shared with tread): N − round(p·N), halves to even.
    assert [visible_count(16, 0.75), visible_count(10, 0.7), visible_count(100, 0.29)] == [4, 3, 71]
    # p = 0.75 half cases: round(7.5) = 8 of 10 routed, round(10.5) = 10 of 14, round(4.5) = 4 of 6.
    assert [visible_count(10, 0.75), visible_count(14, 0.75), visible_count(6, 0.75)] == [2, 4, 2]
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
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        plain = denoise(model, x, t, text, mask, _ctx(False, {}))
    # At the default init the fusion changes the function ...
    assert not torch.allclose(out, plain)
    # ... and with fusion_init = "identity" the whole forward equals the plain PRX forward.
    identity, _, _ = _run(_router(), training=False, fusion=SprintFusion(32, init="identity"))
    torch.testing.assert_close(identity, plain, rtol=0, atol=0)


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
    assert {id(fusion.fuse.weight), id(fusion.fuse.bias), id(fusion.mask_token)} <= optimised
    before = [p.detach().clone() for p in fusion.parameters()]
    run_steps(trainer, 1)
    assert all(not torch.equal(a, b) for a, b in zip(before, fusion.parameters(), strict=True))
    assert {"extras.sprint.fuse.weight", "extras.sprint.fuse.bias", "extras.sprint.mask_token"} <= set(
        trainable.state_dict()
    )
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
    # Refused by the recipe check (prx-run check and a run's start), before anything is built.
    with pytest.raises(RecipeError, match=r"'router\.end' is 5, but model\.depth = 2 has blocks 0\.\.1"):
        _trainer(tmp_path, "deep", {"router": {"end": 5}})


def test_the_recipe_chooses_the_fusion_init(tmp_path: Path) -> None:
    default = _trainer(tmp_path, "init-default").run.trainable.extras["sprint"]
    again = _trainer(tmp_path, "init-again").run.trainable.extras["sprint"]
    identity = _trainer(tmp_path, "init-identity", {"router": {"fusion_init": "identity"}}).run.trainable.extras[
        "sprint"
    ]
    hidden = default.hidden_size
    eye = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
    assert not torch.equal(default.fuse.weight, eye) and torch.equal(identity.fuse.weight, eye)
    assert torch.equal(identity.fuse.bias, torch.zeros(hidden))
    # The default draw is keyed by the recipe seed: the same recipe builds the same fusion.
    assert torch.equal(default.fuse.weight, again.fuse.weight) and torch.equal(default.fuse.bias, again.fuse.bias)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"start": 3, "end": 2}, "start"),
        ({"start": -1}, "start"),
        ({"ratio": 1.0}, "ratio"),
        ({"fusion_init": "zeros"}, "fusion_init"),
    ],
)
def test_config_rejects_bad_values(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SprintConfig(**table)
