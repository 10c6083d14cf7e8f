"""Tests for the ``tread`` router: route maths by hand, the block loop, seeding, self-guidance."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from prx_tread import TreadConfig  # noqa: E402
from prx_tread.router import SelfGuidance, TreadRouter  # noqa: E402

from prx_core import hookimpl  # noqa: E402
from prx_core.config import RecipeError  # noqa: E402
from prx_core.context import ForwardContext, StepContext  # noqa: E402
from prx_core.denoiser import build_model, denoise  # noqa: E402
from prx_core.flow import timestep_grid  # noqa: E402
from prx_core.keys import ROUTE_PLAN, RoutePlan, Stash  # noqa: E402
from prx_core.plugins import installed_plugins  # noqa: E402
from prx_core.recipe import ModelConfig  # noqa: E402
from prx_core.routing import (  # noqa: E402
    choose_visible,
    gather_rope,
    gather_tokens,
    scatter_tokens,
    visible_count,
)
from prx_core.seeding import generator_for  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe  # noqa: E402
from prx_core.trainer import Trainer  # noqa: E402

#: 8×8 px, patch 2 → 16 image tokens; 3 blocks so a span 1..1 has a block on each side.
TINY = ModelConfig(in_channels=3, patch_size=2, hidden_size=32, num_heads=2, axes_dim=(8, 8), depth=3)


def _model() -> torch.nn.Module:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    # PRX zero-initialises modulation and the final layer; random weights make every block count.
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


def _router(**overrides: Any) -> TreadRouter:
    table = {"start": 1, "end": 1, "ratio": 0.5, **overrides}
    return TreadRouter(TreadConfig(**table), seed=0)


def _train_ctx(seed: int = 5) -> ForwardContext:
    return ForwardContext(stash=Stash(), generator=torch.Generator().manual_seed(seed), training=True)


def _eval_ctx() -> ForwardContext:
    return ForwardContext(stash=Stash(), generator=None, training=False)


# --------------------------------------------------------------------------- route maths


@pytest.mark.parametrize(
    ("length", "ratio", "expected"),
    [
        # Halves round to even (Python's round, as the public code, reference.md §8):
        (255, 0.5, 127),  # round(127.5) = 128 routed, 255 − 128 = 127 kept (⌈127.5⌉ = 128 would keep one more)
        (5, 0.5, 3),  # round(2.5) = 2 routed, 3 kept
        (7, 0.5, 3),  # round(3.5) = 4 routed, 3 kept
        (10, 0.25, 8),  # round(2.5) = 2 routed
        (6, 0.25, 4),  # round(1.5) = 2 routed
        # Other fractions round to nearest:
        (16, 0.5, 8),
        (16, 0.75, 4),
        (16, 0.3, 11),  # round(4.8) = 5 routed
        (10, 0.3, 7),  # 0.3·10 = 3.0000000000000004 in floats: 3 routed
        (10, 0.7, 3),
        (100, 0.29, 71),  # 0.29·100 = 28.999999999999996 in floats: 29 routed
        (1024, 0.5, 512),
        # p = 0 routes nothing; p > 0 routes at least one token and keeps at least one:
        (16, 0.0, 16),
        (16, 0.01, 15),  # round(0.16) = 0, raised to 1 routed
        (3, 0.99, 1),  # round(2.97) = 3, lowered to N − 1 = 2 routed
        (1, 0.5, 1),  # a single token always stays
    ],
)
def test_visible_count_keeps_n_minus_the_rounded_routed_count(length: int, ratio: float, expected: int) -> None:
    assert visible_count(length, ratio) == expected


def test_visible_count_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="ratio"):
        visible_count(16, 1.0)
    with pytest.raises(ValueError, match="length"):
        visible_count(0, 0.5)


def test_choose_visible_draws_sorted_distinct_subsets_from_the_generator() -> None:
    idx_BK = choose_visible(4, 16, 0.5, torch.Generator().manual_seed(0))
    assert idx_BK.shape == (4, 8) and idx_BK.dtype == torch.long
    for row in idx_BK.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < 16
    assert len({tuple(r) for r in idx_BK.tolist()}) == 4  # each sample its own route
    again = choose_visible(4, 16, 0.5, torch.Generator().manual_seed(0))
    other = choose_visible(4, 16, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(idx_BK, again) and not torch.equal(idx_BK, other)


def test_gather_and_scatter_match_hand_computed_tensors() -> None:
    # Two samples, four tokens of width 2: token j of sample b is [10b + j, −(10b + j)].
    full_BNH = torch.tensor([[[j, -j] for j in range(4)], [[10 + j, -10 - j] for j in range(4)]], dtype=torch.float32)
    idx_BK = torch.tensor([[0, 2], [1, 3]])
    assert torch.equal(gather_tokens(full_BNH, idx_BK), torch.tensor([[[0.0, -0.0], [2, -2]], [[11, -11], [13, -13]]]))
    new_BKH = torch.tensor([[[100.0, 100], [102, 102]], [[111, 111], [113, 113]]])
    expected = torch.tensor(
        [[[100.0, 100], [1, -1], [102, 102], [3, -3]], [[10, -10], [111, 111], [12, -12], [113, 113]]]
    )
    assert torch.equal(scatter_tokens(full_BNH, new_BKH, idx_BK), expected)


def test_scatter_promotes_dtypes_without_rounding_routed_tokens() -> None:
    full_BNH = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = scatter_tokens(full_BNH, torch.zeros(2, 2, 3), torch.tensor([[0, 4], [1, 2]]))
    assert out.dtype == torch.float64
    assert torch.equal(out[0, 1:4], full_BNH[0, 1:4]) and torch.equal(out[1, [0, 3, 4]], full_BNH[1, [0, 3, 4]])


def test_gather_rope_picks_each_samples_rows_along_the_token_dim() -> None:
    rope = torch.randn(2, 1, 6, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    idx_BK = torch.tensor([[0, 3, 5], [1, 2, 4]])
    expected = torch.stack([rope[b, :, idx_BK[b]] for b in range(2)])
    assert torch.equal(gather_rope(rope, idx_BK), expected)
    # A batch-1 table (shared positions) is broadcast to the route's batch.
    shared = rope[:1]
    assert torch.equal(gather_rope(shared, idx_BK), torch.stack([shared[0, :, idx_BK[b]] for b in range(2)]))


# --------------------------------------------------------------------------- the block loop


def test_span_blocks_see_the_visible_tokens_and_routed_tokens_pass_unchanged() -> None:
    model = _model()
    x, t, text, mask = _inputs()
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(
            block.register_forward_pre_hook(
                lambda m, a, kw, i=i: seen[i].append(kw["hidden_states"]) or None, with_kwargs=True
            )
        )
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)))
    ctx = _train_ctx()
    try:
        with torch.no_grad():
            denoise(model, x, t, text, mask, ctx, router=_router(ratio=0.3))
    finally:
        for h in handles:
            h.remove()
    keep = 16 - 5  # p = 0.3: round(4.8) = 5 of 16 tokens are routed, 11 run through block 1
    assert [seen[i][0].shape[1] for i in range(3)] == [16, keep, 16]
    plan = ctx.stash[ROUTE_PLAN]
    assert (plan.full_length, plan.start, plan.end, tuple(plan.visible_idx_BK.shape)) == (16, 1, 1, (3, keep))
    before, after = outputs[0], seen[2][0]  # block 0's output enters the span; block 2 gets the exit
    for b in range(3):
        visible = plan.visible_idx_BK[b].tolist()
        routed = [j for j in range(16) if j not in visible]
        assert len(routed) == 5
        assert torch.equal(after[b, routed], before[b, routed])  # bitwise: they skipped block 1
        assert torch.equal(seen[1][0][b], before[b, visible])  # the span gets the visible ones, in order
        assert torch.equal(after[b, visible], outputs[1][b])


def test_visible_tokens_keep_their_rope_rows() -> None:
    model = _model()
    x, t, text, mask = _inputs()
    ropes: list[torch.Tensor] = []
    handle = model.blocks[1].register_forward_pre_hook(
        lambda m, a, kw: ropes.append(kw["image_rotary_emb"]) or None, with_kwargs=True
    )
    ctx = _train_ctx()
    try:
        with torch.no_grad():
            denoise(model, x, t, text, mask, ctx, router=_router())
    finally:
        handle.remove()
    from diffusers.models.transformers.transformer_prx import get_image_ids

    full_rope = model.pe_embedder(get_image_ids(3, 8, 8, patch_size=2, device=x.device))
    idx = ctx.stash[ROUTE_PLAN].visible_idx_BK
    assert torch.equal(ropes[0], torch.stack([full_rope[b, :, idx[b]] for b in range(3)]))


def test_p_zero_equals_the_unrouted_forward_bitwise() -> None:
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        plain = denoise(model, x, t, text, mask, _train_ctx())
        routed = denoise(model, x, t, text, mask, _train_ctx(), router=_router(ratio=0.0))
        half = denoise(model, x, t, text, mask, _train_ctx(), router=_router(ratio=0.5))
    assert torch.equal(routed, plain)
    assert not torch.equal(half, plain)  # a real route does change the output


def test_a_tiny_ratio_still_routes_one_token() -> None:
    # p = 0.01 of 16 tokens: round(0.16) = 0, but the public code routes at least one when p > 0.
    model = _model()
    x, t, text, mask = _inputs()
    ctx = _train_ctx()
    with torch.no_grad():
        denoise(model, x, t, text, mask, ctx, router=_router(ratio=0.01))
    assert ctx.stash[ROUTE_PLAN].visible_idx_BK.shape == (3, 15)


def test_sampling_is_unrouted_when_train_only_and_reproducible_otherwise() -> None:
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        plain = denoise(model, x, t, text, mask, _eval_ctx())
        ctx = _eval_ctx()
        assert torch.equal(denoise(model, x, t, text, mask, ctx, router=_router()), plain)
        assert ROUTE_PLAN not in ctx.stash
        always = _router(train_only=False)
        first_ctx, second_ctx = _eval_ctx(), _eval_ctx()
        first = denoise(model, x, t, text, mask, first_ctx, router=always)
        second = denoise(model, x, t, text, mask, second_ctx, router=always)
    assert not torch.equal(first, plain) and torch.equal(first, second)
    idx = first_ctx.stash[ROUTE_PLAN].visible_idx_BK
    assert torch.equal(idx, second_ctx.stash[ROUTE_PLAN].visible_idx_BK)
    assert all(torch.equal(row, idx[0]) for row in idx)  # at sampling one route serves the whole batch


# --------------------------------------------------------------------------- in the trainer


class _RouteSpy:
    """A test-only plugin: records the route plan every micro-step publishes."""

    def __init__(self) -> None:
        self.plans: dict[tuple[int, int, int], RoutePlan] = {}

    @hookimpl
    def prx_loss_terms(self, step: StepContext) -> None:
        self.plans[(step.step, step.micro_step, step.run.rank)] = step.stash[ROUTE_PLAN]


def _trainer(tmp_path: Path, name: str, patch: dict[str, Any] | None = None, resume: str | None = None) -> Trainer:
    base: dict[str, Any] = {
        "router": {"use": "tread", "start": 0, "end": 1, "ratio": 0.5},
        "train": {"global_batch": 4, "micro_batch": 2},  # 2 micro-steps per step
    }
    from prx_core.recipe import deep_merge

    recipe = tiny_recipe(tmp_path / f"recipe-{name}", deep_merge(base, patch or {}))
    return make_trainer(recipe, tmp_path / "run", resume=resume)


def _spy(trainer: Trainer) -> _RouteSpy:
    spy = _RouteSpy()
    trainer.recipe.active.manager.register(spy, name="route-spy")
    return spy


def test_routes_are_keyed_by_step_micro_step_and_rank(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "keys")
    assert trainer.guidance() is None  # self_guidance = 0: sampling keeps classifier-free guidance
    spy = _spy(trainer)
    run = trainer.run
    for step, micro in [(0, 0), (0, 1), (1, 0)]:
        trainer.micro_step(step, micro)
    first = spy.plans[(0, 0, 0)].visible_idx_BK
    trainer.micro_step(0, 0)  # the same micro-step again (e.g. re-run after a recomputation)
    assert torch.equal(spy.plans[(0, 0, 0)].visible_idx_BK, first)
    run.rank = 1  # what rank 1 of a 2-process run would draw at the same step
    try:
        trainer.micro_step(0, 0)
    finally:
        run.rank = 0
    assert first.shape == (2, 8)  # 16 tokens of the 16-px tiny recipe, half visible
    others = [spy.plans[k].visible_idx_BK for k in [(0, 1, 0), (1, 0, 0), (0, 0, 1)]]
    assert all(not torch.equal(first, o) for o in others)
    # And it is exactly the core's keyed generator that drew it.
    for (step, micro, rank), plan in spy.plans.items():
        expected = choose_visible(2, 16, 0.5, generator_for(trainer.recipe.seed, "route", step, micro, rank))
        assert torch.equal(plan.visible_idx_BK, expected)


def test_activation_checkpoint_recomputation_sees_the_same_route(tmp_path: Path) -> None:
    checkpointed = _trainer(tmp_path, "ckpt", {"train": {"activation_checkpointing": True}})
    plain = _trainer(tmp_path / "plain", "plain")
    inputs: list[torch.Tensor] = []
    block = checkpointed.run.require("trainable").model.blocks[1]
    handle = block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()) or None)
    try:
        loss, _ = checkpointed.micro_step(0, 0)
        loss.backward()
    finally:
        handle.remove()
    assert len(inputs) == 2  # the forward, then the recomputation during backward
    assert inputs[0].shape[1] == 8 and torch.equal(inputs[0], inputs[1])
    plain_loss, _ = plain.micro_step(0, 0)
    plain_loss.backward()
    assert torch.equal(loss, plain_loss)
    grads = [p.grad for p in checkpointed.run.require("trainable").parameters()]
    plain_grads = [p.grad for p in plain.run.require("trainable").parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(grads, plain_grads, strict=True))


def test_resume_reproduces_the_routes(tmp_path: Path) -> None:
    first = _trainer(tmp_path, "a")
    spy = _spy(first)
    run_steps(first, 1)
    first.save()
    run_steps(first, 1)
    second = _trainer(tmp_path, "a", resume="auto")
    resumed_spy = _spy(second)
    assert second.step == 1
    run_steps(second, 1)
    for micro in (0, 1):
        assert torch.equal(resumed_spy.plans[(1, micro, 0)].visible_idx_BK, spy.plans[(1, micro, 0)].visible_idx_BK)
    assert not torch.equal(spy.plans[(0, 0, 0)].visible_idx_BK, spy.plans[(1, 0, 0)].visible_idx_BK)


def test_span_beyond_the_model_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    # Refused by the recipe check (prx-run check and a run's start), before anything is built.
    with pytest.raises(RecipeError, match=r"'router\.end' is 2, but model\.depth = 2 has blocks 0\.\.1"):
        _trainer(tmp_path, "deep", {"router": {"end": 2}})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"start": 3, "end": 2}, "start"),
        ({"start": -1}, "start"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"self_guidance": -1.0}, "self_guidance"),
    ],
)
def test_config_rejects_bad_values(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TreadConfig(**table)


class _HandRouter:
    """An independent routed pass for the self-guidance check: per-sample Python loops."""

    def __init__(self, idx_BK: torch.Tensor) -> None:
        self.start, self.end, self.idx = 0, 1, idx_BK
        self.full: torch.Tensor | None = None

    def enter(self, img: torch.Tensor, rope: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.full = img
        tokens = torch.stack([img[b, self.idx[b]] for b in range(img.shape[0])])
        return tokens, torch.stack([rope[b, :, self.idx[b]] for b in range(img.shape[0])])

    def exit(self, img: torch.Tensor, ctx: Any) -> torch.Tensor:
        assert self.full is not None
        out = self.full.clone()
        for b in range(out.shape[0]):
            out[b, self.idx[b]] = img[b]
        return out


def test_self_guidance_matches_a_hand_written_two_pass_computation(tmp_path: Path) -> None:
    # On the EMA weights when prx-ema is installed (the sampling weights then differ from the trained ones).
    ema = "ema" in installed_plugins()
    patch = {"plugins": {"ema": {"decay": 0.5, "every": 1}}} if ema else {}
    _check_self_guidance(tmp_path, patch, ema=ema)


def _hand_route(recipe_seed: int, sample_seed: int, key: int, length: int, ratio: float) -> torch.Tensor:
    """Sample ``key``'s self-guidance route written out: a uniformly random sorted subset of
    N − round(p·N) tokens, drawn from a generator keyed by (run seed, purpose, noise seed, key)."""
    keep = length - round(ratio * length)
    scores = torch.rand(1, length, generator=generator_for(recipe_seed, "tread-self-guidance", sample_seed, key))
    return torch.sort(torch.argsort(scores, dim=1, stable=True)[:, :keep], dim=1).values


def _check_self_guidance(tmp_path: Path, patch: dict[str, Any], *, ema: bool) -> None:
    from prx_core.recipe import deep_merge

    scale, steps, seed, prompts = 2.0, 3, 11, ["a red square", "a blue circle at the top"]
    trainer = _trainer(tmp_path, "sg", deep_merge({"router": {"self_guidance": scale}}, patch))
    run_steps(trainer, 2)  # move the weights (and the EMA) off their zero-initialised final layer
    modules = trainer.sampling_modules()
    assert (modules is not trainer.run.trainable) == ema
    if ema:  # the EMA copy really differs from the trained weights, so using it is visible
        assert not torch.equal(
            modules.model.final_layer.linear.weight, trainer.run.trainable.model.final_layer.linear.weight
        )
    images = trainer.generate(prompts, steps, cfg=5.0, seed=seed, size=16)
    assert trainer.run.router._forced is None  # forced routing was on only around the routed passes

    # By hand: Euler on the shifted grid with out = routed + s·(full − routed), real prompt in both,
    # sample i routed by its own key (its noise index i) with one route for every step.
    run = trainer.run
    objective = run.require("objective")
    states, mask = run.require("text_encoder").encode(prompts)
    x = torch.stack([torch.randn(3, 16, 16, generator=generator_for(seed, "sample", i)) for i in range(2)])
    grid = timestep_grid(steps, objective.shift)
    idx = torch.cat([_hand_route(trainer.recipe.seed, seed, i, 16, 0.5) for i in range(2)])
    assert not torch.equal(idx[0], idx[1])
    differs = False
    with torch.no_grad():
        for i in range(steps):
            t_B = torch.full((2,), float(grid[i]))
            ctx = ForwardContext(stash=Stash(), generator=None, training=False, extras=modules.extras)
            full = objective.velocity(denoise(modules.model, x, t_B, states, mask, ctx).float(), x, t_B)
            hand = _HandRouter(idx)
            routed_out = denoise(modules.model, x, t_B, states, mask, ctx, router=hand)  # type: ignore[arg-type]
            routed = objective.velocity(routed_out.float(), x, t_B)
            differs = differs or not torch.allclose(full, routed)
            x = x + float(grid[i + 1] - grid[i]) * (routed + scale * (full - routed))
    expected = run.require("latent_space").decode(x).float().clamp(0, 1)
    assert differs, "the routed pass must differ from the full pass for this test to mean anything"
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    # The core's promise holds with self-guidance too: an image does not depend on its batch.
    alone = trainer.generate(prompts[1:], steps, cfg=5.0, seed=seed, size=16, noise_indices=[1])
    torch.testing.assert_close(alone[0], images[1], rtol=0, atol=1e-5)


def _record_routes(monkeypatch: pytest.MonkeyPatch, router: TreadRouter) -> list[torch.Tensor]:
    """Every route the router hands the span, in call order (the full passes route nothing)."""
    routes: list[torch.Tensor] = []
    original = router.enter

    def enter(img: torch.Tensor, rope: torch.Tensor, ctx: ForwardContext) -> Any:
        out = original(img, rope, ctx)
        if out is not None:
            routes.append(ctx.stash[ROUTE_PLAN].visible_idx_BK.clone())
        return out

    monkeypatch.setattr(router, "enter", enter)
    return routes


def test_self_guidance_keeps_one_route_per_sample_for_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps, seed = 4, 3
    prompts = ["a red square", "a blue circle at the top", "a green triangle"]
    keys = [5, 0, 9]  # noise indices: the samples' identities
    trainer = _trainer(tmp_path, "per-sample", {"router": {"self_guidance": 2.0}})
    run_steps(trainer, 1)
    routes = _record_routes(monkeypatch, trainer.run.router)
    images = trainer.generate(prompts, steps, cfg=5.0, seed=seed, size=16, noise_indices=keys)
    assert len(routes) == steps  # one routed pass per Euler step
    first = routes[0]
    assert first.shape == (3, 8)
    assert all(torch.equal(r, first) for r in routes)  # the same route at every step, for every sample
    assert len({tuple(row) for row in first.tolist()}) == 3  # and each sample its own
    for b, key in enumerate(keys):
        assert torch.equal(first[b], _hand_route(trainer.recipe.seed, seed, key, 16, 0.5)[0])

    # The same samples in another order and another batch: each keeps its route and its image.
    routes.clear()
    order = [2, 0]  # sample keys 9 and 5, now at positions 0 and 1 of a batch of two
    shuffled = trainer.generate(
        [prompts[i] for i in order], steps, cfg=5.0, seed=seed, size=16, noise_indices=[keys[i] for i in order]
    )
    assert len(routes) == steps and all(torch.equal(r, routes[0]) for r in routes)
    for position, original_position in enumerate(order):
        assert torch.equal(routes[0][position], first[original_position])
        torch.testing.assert_close(shuffled[position], images[original_position], rtol=0, atol=1e-5)

    # Another noise seed draws other routes for the same keys.
    routes.clear()
    trainer.generate(prompts, 1, cfg=5.0, seed=seed + 1, size=16, noise_indices=keys)
    assert not torch.equal(routes[0], first)


def test_unbound_self_guidance_refuses_to_guess_sample_keys(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "unbound", {"router": {"self_guidance": 2.0}})
    guidance = trainer.guidance()
    assert isinstance(guidance, SelfGuidance)
    x = torch.zeros(1, 3, 16, 16)
    text = (torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="for_samples"):
        guidance(lambda *a: x, x, torch.ones(1), text, text)
    bound = guidance.for_samples(0, [4])
    with pytest.raises(ValueError, match="bound to 1 samples but the forward has 2"):
        bound.route(2, 16)


def test_guidance_hook_ignores_runs_with_another_or_no_router() -> None:
    import prx_tread

    assert prx_tread.prx_guidance(SimpleNamespace(router=None)) is None  # type: ignore[arg-type]
    assert prx_tread.prx_guidance(SimpleNamespace(router=object())) is None  # type: ignore[arg-type]
