"""Tests for ``resolution_aware``: diffusers parity (vec), token layout, zero-init behaviour, seams."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import PRXTransformer2DModel
from diffusers.models.transformers.transformer_prx import PRXResolutionEmbedder
from prx_resolution_aware import NAME, ResolutionAwareConfig, prx_build_modules, prx_configure
from prx_resolution_aware.embedder import (
    ResolutionSeam,
    ResolutionTokens,
    ResolutionVector,
    axis_sinusoid,
    build_embedder,
)

from prx_core.config import RecipeError, bind
from prx_core.context import ForwardContext
from prx_core.denoiser import denoise
from prx_core.keys import Stash
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe

HIDDEN = 32


def _model(resolution_embeds: bool = False) -> PRXTransformer2DModel:
    """A tiny PRX with random weights everywhere: at init the blocks' adaLN gates are zero, so the
    blocks would be identities and nothing attention sees could show in the output."""
    torch.manual_seed(0)
    model = PRXTransformer2DModel(
        in_channels=3,
        patch_size=4,
        context_in_dim=12,
        hidden_size=HIDDEN,
        num_heads=2,
        depth=2,
        axes_dim=[8, 8],
        resolution_embeds=resolution_embeds,
    ).eval()
    return _randomize_(model, seed=11)


def _randomize_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _ctx(module: torch.nn.Module | None) -> ForwardContext:
    return ForwardContext(
        stash=Stash(), generator=None, training=False, extras={} if module is None else {NAME: module}
    )


def _inputs(batch: int = 2, height: int = 16, width: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn(batch, 3, height, width, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, 6, 12, generator=g)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])[:batch]
    return x_t, t, text, mask


# ---------------------------------------------------------------------------- vec mode


def test_axis_sinusoid_hand_values() -> None:
    emb = axis_sinusoid(torch.tensor([16.0, 3.0]), max_period=10000)
    assert emb.shape == (2, 128)
    # cos first (flip_sin_to_cos), frequencies 10000^(−i/64), i = 0..63
    for row, value in enumerate((16.0, 3.0)):
        for i in (0, 1, 17, 63):
            freq = math.exp(-math.log(10000) * i / 64)
            assert emb[row, i].item() == pytest.approx(math.cos(value * freq), abs=1e-5)
            assert emb[row, 64 + i].item() == pytest.approx(math.sin(value * freq), abs=1e-5)


def test_vec_matches_diffusers_resolution_embedder() -> None:
    reference = _randomize_(PRXResolutionEmbedder(HIDDEN, max_period=10000))
    ours = ResolutionVector(HIDDEN, max_period=10000)
    ours.load_state_dict(reference.state_dict())  # same keys: mlp.in_layer.*, mlp.out_layer.*
    height, width = torch.tensor([16.0, 32.0, 64.0]), torch.tensor([16.0, 8.0, 128.0])
    expected = reference(height, width, dtype=torch.float32)
    assert torch.equal(ours(height, width), expected)
    assert expected.abs().sum() > 0


def test_vec_seam_equals_diffusers_builtin_resolution_embeds() -> None:
    builtin = _model(resolution_embeds=True)
    _randomize_(builtin.resolution_embedder, seed=2)
    plain = _model(resolution_embeds=False)
    plain.load_state_dict({k: v for k, v in builtin.state_dict().items() if not k.startswith("resolution_embedder.")})
    ours = ResolutionVector(HIDDEN)
    ours.load_state_dict(
        {
            k.removeprefix("resolution_embedder."): v
            for k, v in builtin.state_dict().items()
            if k.startswith("resolution_embedder.")
        }
    )
    x_t, t, text, mask = _inputs()
    with torch.no_grad():
        expected = builtin(x_t, t, text, attention_mask=mask).sample
        got = denoise(plain, x_t, t, text, mask, _ctx(ours), conditioning=[ResolutionSeam("vec")])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, denoise(plain, x_t, t, text, mask, _ctx(None)), atol=1e-4)


def test_vec_zero_init_is_a_bitwise_no_op() -> None:
    model = _model()
    x_t, t, text, mask = _inputs()
    embedder = build_embedder("vec", HIDDEN, 10000)
    with torch.no_grad():
        without = denoise(model, x_t, t, text, mask, _ctx(None))
        with_seam = denoise(model, x_t, t, text, mask, _ctx(embedder), conditioning=[ResolutionSeam("vec")])
    assert torch.equal(with_seam, without)
    # And the first layer is random: the no-op comes from the zero last layer alone.
    assert embedder.mlp.in_layer.weight.abs().sum() > 0
    assert embedder.mlp.out_layer.weight.abs().sum() == 0 and embedder.mlp.out_layer.bias.abs().sum() == 0


# ---------------------------------------------------------------------------- token mode


def test_token_seam_prepends_two_tokens_and_extends_mask() -> None:
    tokens = _randomize_(ResolutionTokens(HIDDEN))
    txt = torch.randn(2, 5, HIDDEN)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    vec = torch.randn(2, HIDDEN)
    x_t = torch.zeros(2, 3, 16, 24)
    new_txt, new_mask, new_vec = ResolutionSeam("token").condition(txt, mask, vec, x_t, _ctx(tokens))
    assert new_txt.shape == (2, 7, HIDDEN)
    assert torch.equal(new_txt[:, 2:], txt)
    assert new_mask is not None and new_mask.dtype == torch.bool
    assert new_mask.tolist() == [[True, True, True, True, False, False, False], [True] * 7]
    assert new_vec is vec
    # Token 0 embeds H = 16 with the height MLP, token 1 embeds W = 24 with the width MLP.
    expected_h = tokens.height(axis_sinusoid(torch.tensor([16.0]), 10000))
    expected_w = tokens.width(axis_sinusoid(torch.tensor([24.0]), 10000))
    torch.testing.assert_close(new_txt[0, 0], expected_h[0])
    torch.testing.assert_close(new_txt[1, 1], expected_w[0])
    # No mask stays no mask (everything attended).
    _, none_mask, _ = ResolutionSeam("token").condition(txt, None, vec, x_t, _ctx(tokens))
    assert none_mask is None


def test_token_mode_tells_portrait_from_landscape() -> None:
    tokens = _randomize_(ResolutionTokens(HIDDEN))
    portrait = tokens(torch.tensor([32.0]), torch.tensor([16.0]))
    landscape = tokens(torch.tensor([16.0]), torch.tensor([32.0]))
    # As a *set* of keys (text keys have no position) the two must still differ.
    assert not torch.allclose(portrait.sort(dim=1).values, landscape.sort(dim=1).values)


def test_token_zero_init_tokens_are_zero_and_resolution_reaches_output_only_through_last_layer() -> None:
    model = _model()
    seam = [ResolutionSeam("token")]
    embedder = build_embedder("token", HIDDEN, 10000)
    small, large = _inputs(height=16, width=16), _inputs(height=16, width=32)

    def run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            return denoise(model, *inputs, _ctx(module), conditioning=seam)  # type: ignore[call-arg]

    # At init the tokens are exactly zero for every size...
    assert torch.equal(embedder(torch.tensor([16.0]), torch.tensor([32.0])), torch.zeros(1, 2, HIDDEN))
    # ...so the first layer cannot change the output: randomising it changes nothing.
    reference = run(embedder, small)
    with torch.no_grad():
        embedder.height.in_layer.weight.add_(1.0)
        embedder.width.in_layer.bias.add_(1.0)
    assert torch.equal(run(embedder, small), reference)
    # Zero tokens are still attended (two extra zero keys take softmax mass): NOT a no-op vs no plugin.
    with torch.no_grad():
        without = denoise(model, *small, _ctx(None))  # type: ignore[call-arg]
    assert not torch.allclose(reference, without)
    # Once the last layers are non-zero, the output depends on the embedder and on the size.
    before = run(embedder, small)
    _randomize_(embedder.height.out_layer, seed=3)
    _randomize_(embedder.width.out_layer, seed=4)
    assert not torch.allclose(run(embedder, small), before)
    # Same model, same image content per token grid, different W -> different tokens.
    assert not torch.equal(
        embedder(torch.tensor([16.0]), torch.tensor([16.0])), embedder(torch.tensor([16.0]), torch.tensor([32.0]))
    )
    assert run(embedder, large).shape == (2, 3, 16, 32)


# ---------------------------------------------------------------------------- seam plumbing


def test_seam_uses_the_module_of_the_weights_being_run() -> None:
    a = _randomize_(ResolutionVector(HIDDEN), seed=1)
    b = _randomize_(ResolutionVector(HIDDEN), seed=2)
    txt, vec = torch.zeros(1, 3, HIDDEN), torch.zeros(1, HIDDEN)
    x_t = torch.zeros(1, 3, 8, 8)
    seam = ResolutionSeam("vec")
    va = seam.condition(txt, None, vec, x_t, _ctx(a))[2]
    vb = seam.condition(txt, None, vec, x_t, _ctx(b))[2]
    assert not torch.equal(va, vb)
    with pytest.raises(RuntimeError, match="no extra module 'resolution_aware'"):
        seam.condition(txt, None, vec, x_t, _ctx(None))


def _fake_run(mode: str, resolution_embeds: bool) -> SimpleNamespace:
    seams: dict[str, object] = {}
    recipe = SimpleNamespace(
        name="t", seed=0, model=SimpleNamespace(resolution_embeds=resolution_embeds, hidden_size=HIDDEN)
    )
    return SimpleNamespace(
        recipe=recipe,
        device=torch.device("cpu"),
        plugin_config=lambda name: ResolutionAwareConfig(mode=mode),  # type: ignore[arg-type]
        add_conditioning=seams.__setitem__,
        require=lambda what: SimpleNamespace(param_dtype=torch.float64),
        seams=seams,
    )


def test_configure_refuses_vec_with_builtin_resolution_embeds() -> None:
    with pytest.raises(RecipeError, match="model.resolution_embeds"):
        prx_configure(_fake_run("vec", True))  # type: ignore[arg-type]
    run = _fake_run("token", True)  # tokens and the built-in vector are different signals
    prx_configure(run)  # type: ignore[arg-type]
    assert isinstance(run.seams[NAME], ResolutionSeam)


def test_build_modules_uses_policy_dtype() -> None:
    modules = prx_build_modules(_fake_run("vec", False))  # type: ignore[arg-type]
    assert modules is not None and set(modules) == {NAME}
    assert all(p.dtype == torch.float64 for p in modules[NAME].parameters())


def test_config() -> None:
    assert ResolutionAwareConfig() == ResolutionAwareConfig(mode="token", max_period=10000)
    with pytest.raises(ValueError, match="max_period"):
        ResolutionAwareConfig(max_period=1)
    with pytest.raises(RecipeError, match="did you mean 'vec'"):
        bind(ResolutionAwareConfig, {"mode": "vecc"}, prefix="plugins.resolution_aware")
    with pytest.raises(ValueError, match="unknown resolution_aware mode"):
        ResolutionSeam("both")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- with the trainer


def test_trainer_vec_first_step_loss_equals_plain(tmp_path: Path) -> None:
    plain = make_trainer(tiny_recipe(tmp_path / "a"), tmp_path / "run_a")
    vec = make_trainer(tiny_recipe(tmp_path / "b", {"plugins": {NAME: {"mode": "vec"}}}), tmp_path / "run_b")
    assert NAME in vec.run.require("trainable").extras
    # Bitwise equal at init; afterwards they part (the embedder learns and shares the grad-norm clip).
    assert run_steps(vec, 1) == run_steps(plain, 1)
    out_layer = vec.run.require("trainable").extras[NAME].mlp.out_layer
    assert out_layer.weight.abs().sum() > 0  # it trains


def test_trainer_token_mode_trains_and_samples(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", {"plugins": {NAME: {}}}), tmp_path / "run")
    losses = run_steps(trainer, 2)
    assert all(math.isfinite(x) for x in losses)
    assert trainer.run.require("trainable").extras[NAME].height.out_layer.weight.abs().sum() > 0
    images = trainer.generate(["a red circle"], steps=2, cfg=2.0, seed=0, size=16)
    assert images.shape == (1, 3, 16, 16)


def test_trainer_refuses_vec_with_resolution_embeds(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r", {"model": {"resolution_embeds": True}, "plugins": {NAME: {"mode": "vec"}}})
    with pytest.raises(RecipeError, match="resolution_embeds"):
        make_trainer(recipe, tmp_path / "run")


def test_trainer_init_depends_on_the_recipe_seed_only(tmp_path: Path) -> None:
    """Plain init in prx_build_modules, made deterministic by core's per-plugin seeding."""

    def embedder(name: str, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed + 1000)  # whatever the global generator did before setup
        recipe = tiny_recipe(tmp_path / name, {"seed": seed, "plugins": {NAME: {}}})
        return make_trainer(recipe, tmp_path / f"run_{name}").run.require("trainable").extras[NAME]

    first, again, other = embedder("a", 0), embedder("b", 0), embedder("c", 1)
    for (name, p), q, r in zip(first.named_parameters(), again.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q), name
        if "in_layer" in name:
            assert not torch.equal(p, r), name
