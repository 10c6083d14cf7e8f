"""Tests for the ``ema`` plugin: update maths by hand, buffers and extras, resume, sampling weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gc
import weakref
from pathlib import Path
from types import SimpleNamespace

import prx_ema
import pytest
import torch
from prx_ema import EMAConfig
from prx_ema.ema import EmaState, ema_dtype, ema_update_, make_ema_copy

from prx_core.config import RecipeError, bind
from prx_core.denoiser import TrainableModules
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe


class Extra(torch.nn.Module):
    """A plugin-style extra module with a parameter, a float buffer and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.register_buffer("running", torch.tensor([4.0]))
        self.register_buffer("count", torch.tensor(0))


def _tiny() -> TrainableModules:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(8.0)
    return TrainableModules(model, {"extra": Extra()})  # type: ignore[arg-type]


def _set(live: TrainableModules, w: float, extra: list[float], running: float, count: int) -> None:
    with torch.no_grad():
        live.model.weight.fill_(w)
        live.extras["extra"].weight.copy_(torch.tensor(extra))
        live.extras["extra"].running.fill_(running)
        live.extras["extra"].count.fill_(count)


def _fp32_policy() -> SimpleNamespace:
    return SimpleNamespace(param_dtype=torch.float32, state_dtype=torch.float32)


def test_two_updates_every_two_match_hand_computation() -> None:
    live = _tiny()
    state = EmaState(decay=0.75, every=2, start_step=0, dtype=ema_dtype(_fp32_policy()))
    state.ensure(live)  # before the first optimizer step: the average starts at the initial weights
    # Step 1: weights change, but 1 % 2 != 0 -> no update.
    _set(live, 0.0, [0.0, 0.0], 0.0, 1)
    state.after_optimizer_step(live, 1)
    ema = state.modules
    assert ema is not None
    assert ema.model.weight.item() == 8.0 and ema.extras["extra"].count.item() == 0
    # Step 2: update. ema = 0.75·init + 0.25·w2
    _set(live, 4.0, [5.0, -2.0], 8.0, 2)
    state.after_optimizer_step(live, 2)
    #   model: 0.75·8 + 0.25·4 = 7 ; extra weight: 0.75·[1, 2] + 0.25·[5, −2] = [2, 1]
    #   float buffer: 0.75·4 + 0.25·8 = 5 ; integer buffer: copied -> 2
    assert ema.model.weight.item() == 7.0
    assert ema.extras["extra"].weight.tolist() == [2.0, 1.0]
    assert ema.extras["extra"].running.item() == 5.0
    assert ema.extras["extra"].count.item() == 2
    # Step 3: no update; step 4: ema = 0.75·previous + 0.25·w4
    _set(live, 100.0, [100.0, 100.0], 100.0, 3)
    state.after_optimizer_step(live, 3)
    assert ema.model.weight.item() == 7.0
    _set(live, 3.0, [2.0, 5.0], 1.0, 4)
    state.after_optimizer_step(live, 4)
    #   model: 0.75·7 + 0.25·3 = 6 ; extra: 0.75·[2, 1] + 0.25·[2, 5] = [2, 2] ; buffer: 0.75·5 + 0.25·1 = 4
    assert ema.model.weight.item() == 6.0
    assert ema.extras["extra"].weight.tolist() == [2.0, 2.0]
    assert ema.extras["extra"].running.item() == 4.0
    assert ema.extras["extra"].count.item() == 4
    # The live modules were never touched by the EMA.
    assert live.model.weight.item() == 3.0


def test_start_step_copies_until_then() -> None:
    live = _tiny()
    state = EmaState(decay=0.5, every=1, start_step=2, dtype=torch.get_default_dtype())
    state.ensure(live)
    _set(live, 2.0, [0.0, 0.0], 0.0, 1)
    state.after_optimizer_step(live, 1)
    assert state.modules is not None and state.modules.model.weight.item() == 2.0  # copied
    _set(live, 6.0, [0.0, 0.0], 0.0, 2)
    state.after_optimizer_step(live, 2)
    assert state.modules.model.weight.item() == 6.0  # copied: the average starts here
    _set(live, 2.0, [0.0, 0.0], 0.0, 3)
    state.after_optimizer_step(live, 3)
    assert state.modules.model.weight.item() == 4.0  # 0.5·6 + 0.5·2


def test_bf16_weights_keep_an_fp32_average() -> None:
    live = _tiny().to(torch.bfloat16)
    policy = SimpleNamespace(param_dtype=torch.bfloat16, state_dtype=torch.float32)
    dtype = ema_dtype(policy)
    assert dtype == torch.float32  # the policy's state dtype, not its weight dtype
    ema = make_ema_copy(live, dtype)
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    assert ema.extras["extra"].count.dtype == torch.int64  # integer buffers keep their dtype
    assert not any(p.requires_grad for p in ema.parameters())
    # 0.999 decay moves the average by 0.1% of the gap: representable in fp32, not in bf16.
    with torch.no_grad():
        live.model.weight.fill_(9.0)
    ema_update_(ema, live, 0.999)
    torch.testing.assert_close(ema.model.weight, torch.full((1, 1), 0.999 * 8.0 + 0.001 * 9.0))
    assert ema.model.weight.item() != 8.0


def test_chunked_conversion_matches_single_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    import prx_ema.ema as ema_module

    live = _tiny().to(torch.bfloat16)
    with torch.no_grad():
        live.model.weight.fill_(3.0)
        live.extras["extra"].weight.copy_(torch.tensor([-1.0, 7.0]))
    whole = make_ema_copy(_tiny(), torch.float32)
    chunked = make_ema_copy(_tiny(), torch.float32)
    ema_update_(whole, live, 0.5)
    monkeypatch.setattr(ema_module, "_CHUNK_ELEMENTS", 1)  # one tensor per chunk
    ema_update_(chunked, live, 0.5)
    for a, b in zip(whole.state_dict().values(), chunked.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_ema_dtype_is_the_policy_state_dtype() -> None:
    assert ema_dtype(SimpleNamespace(param_dtype=torch.float32, state_dtype=torch.float64)) == torch.float64


def test_state_dict_round_trip_is_bitwise() -> None:
    live = _tiny()
    state = EmaState(decay=0.9, every=1, start_step=0, dtype=torch.float32)
    state.ensure(live)
    _set(live, 1.5, [0.3, 0.7], 2.0, 5)
    state.after_optimizer_step(live, 1)
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    other = EmaState(decay=0.9, every=1, start_step=0, dtype=torch.float32)
    other.ensure(_tiny())
    other.load_state_dict(saved)
    restored = other.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


def test_config() -> None:
    assert EMAConfig() == EMAConfig(decay=0.999, every=10, start_step=1)
    for bad in ({"decay": 1.5}, {"decay": -0.1}, {"every": 0}, {"start_step": -1}):
        with pytest.raises(ValueError):
            EMAConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="did you mean 'decay'"):
        bind(EMAConfig, {"decya": 0.9}, prefix="plugins.ema")


# ---------------------------------------------------------------------------- with the trainer


def test_default_ema_holds_the_weights_after_the_first_optimizer_step(tmp_path: Path) -> None:
    """reference.md §8: the reference's EMA copies the weights at the end of the first batch, then
    averages at steps 10, 20, …: with the defaults (decay 0.999, every 10) the average is w1 until
    step 10, and 0.999·w1 + 0.001·w10 after it."""
    trainer = make_trainer(
        tiny_recipe(tmp_path / "r", {"plugins": {"ema": {}}, "train": {"steps": 10}}), tmp_path / "run"
    )
    live = trainer.run.require("trainable")
    w0 = [p.detach().clone() for p in live.parameters()]
    run_steps(trainer, 1)
    w1 = [p.detach().clone() for p in live.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(w0, w1, strict=True))  # the step moved the weights
    ema = trainer.sampling_modules()
    assert ema is not live
    for e, w in zip(ema.parameters(), w1, strict=True):
        assert torch.equal(e, w)  # the weights after step 1, not the initial ones
    run_steps(trainer, 8)  # steps 2..9: no update (9 % 10 != 0)
    for e, w in zip(ema.parameters(), w1, strict=True):
        assert torch.equal(e, w)
    run_steps(trainer, 1)  # step 10: the first average
    w10 = [p.detach() for p in live.parameters()]
    for e, a, b in zip(ema.parameters(), w1, w10, strict=True):
        torch.testing.assert_close(e, 0.999 * a + 0.001 * b, rtol=1e-6, atol=1e-7)


def test_start_step_zero_starts_the_average_at_the_initial_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path / "r", {"plugins": {"ema": {"start_step": 0}}}), tmp_path / "run")
    live = trainer.run.require("trainable")
    w0 = [p.detach().clone() for p in live.parameters()]
    run_steps(trainer, 1)
    for e, w in zip(trainer.sampling_modules().parameters(), w0, strict=True):
        assert torch.equal(e, w)


def _ema_state(trainer: object) -> EmaState:
    state: EmaState = trainer.run.plugin_states[prx_ema.INFO.name]  # type: ignore[attr-defined]
    return state


def test_trainer_ema_tracks_all_trainable_weights(tmp_path: Path) -> None:
    trainer = make_trainer(
        tiny_recipe(tmp_path / "r", {"plugins": {"ema": {"decay": 0.5, "every": 1, "start_step": 0}}}), tmp_path / "run"
    )
    live = trainer.run.require("trainable")
    init = [p.detach().clone() for p in live.parameters()]
    # prx_before_training made the copy at setup, before any step, in the policy's state dtype.
    at_setup = _ema_state(trainer).modules
    assert at_setup is not None and at_setup is not live
    assert {p.dtype for p in at_setup.parameters()} == {trainer.run.require("precision").state_dtype}
    assert all(torch.equal(e, w) for e, w in zip(at_setup.parameters(), init, strict=True))
    assert not any(p.requires_grad for p in at_setup.parameters())
    run_steps(trainer, 1)
    after_one = [p.detach().clone() for p in live.parameters()]
    run_steps(trainer, 1)
    after_two = [p.detach().clone() for p in live.parameters()]
    ema = trainer.sampling_modules()
    assert ema is not live and isinstance(ema, TrainableModules)
    # Started at the initial weights: 0.5·(0.5·w0 + 0.5·w1) + 0.5·w2
    for e, w0, w1, w2 in zip(ema.parameters(), init, after_one, after_two, strict=True):
        torch.testing.assert_close(e, 0.5 * (0.5 * w0 + 0.5 * w1) + 0.5 * w2)
    # The state is per run and goes away with it.
    state = weakref.ref(_ema_state(trainer))
    del trainer, live, ema, at_setup
    gc.collect()
    assert state() is None


def test_resume_restores_ema_bitwise_and_continues_identically(tmp_path: Path) -> None:
    patch = {"plugins": {"ema": {"decay": 0.9, "every": 1}}}
    first = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    run_steps(first, 2)
    first.save()
    saved = {k: v.clone() for k, v in _ema_state(first).state_dict().items()}
    run_steps(first, 1)
    continued = _ema_state(first).state_dict()

    second = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run", resume="auto")
    assert second.step == 2
    restored = _ema_state(second).state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    run_steps(second, 1)
    again = _ema_state(second).state_dict()
    assert all(torch.equal(continued[k], again[k]) for k in continued)


def test_generate_uses_ema_weights(tmp_path: Path) -> None:
    def images(trainer: object) -> torch.Tensor:
        return trainer.generate(["a red circle", "a blue square"], steps=2, cfg=2.0, seed=0, size=16)  # type: ignore[attr-defined]

    # decay 1 from the initial weights (start_step 0): the average stays there however long the model trains.
    frozen = make_trainer(
        tiny_recipe(tmp_path / "a", {"plugins": {"ema": {"decay": 1.0, "every": 1, "start_step": 0}}}), tmp_path / "a"
    )
    run_steps(frozen, 2)
    fresh = make_trainer(tiny_recipe(tmp_path / "b"), tmp_path / "b")
    trained = make_trainer(tiny_recipe(tmp_path / "c"), tmp_path / "c")
    run_steps(trained, 2)
    assert torch.equal(images(frozen), images(fresh))
    assert not torch.equal(images(frozen), images(trained))
    # The trained weights of the EMA run equal those of the plain run: only sampling differs.
    for a, b in zip(
        frozen.run.require("trainable").parameters(), trained.run.require("trainable").parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_generate_with_moving_average_equals_loading_it(tmp_path: Path) -> None:
    averaged = make_trainer(
        tiny_recipe(tmp_path / "a", {"plugins": {"ema": {"decay": 0.5, "every": 1}}}), tmp_path / "a"
    )
    run_steps(averaged, 2)
    plain = make_trainer(tiny_recipe(tmp_path / "b"), tmp_path / "b")
    plain.run.require("trainable").load_state_dict(averaged.sampling_modules().state_dict())
    prompts = ["a red circle"]
    assert torch.equal(
        averaged.generate(prompts, steps=2, cfg=2.0, seed=1, size=16),
        plain.generate(prompts, steps=2, cfg=2.0, seed=1, size=16),
    )


def test_validation_loss_is_measured_on_the_ema_weights(tmp_path: Path) -> None:
    """reference.md §4: metrics use the EMA weights when EMA is on, the validation loss included."""
    from prx_core.evaluation import validation_loss

    recipe = tiny_recipe(tmp_path, {"plugins": {"ema": {"decay": 0.5, "every": 1}}})
    trainer = make_trainer(recipe, tmp_path / "run")
    run_steps(trainer, 3)
    trainable = trainer.run.require("trainable")
    ema = trainer.sampling_modules()
    assert ema is not trainable
    trainable.eval()
    with_ema = validation_loss(trainer, [0, 1, 2, 3])
    # Independent check: put the EMA weights into the trained modules and measure those.
    trainable.load_state_dict(ema.state_dict())
    trainer.sampling_modules = lambda: trainable  # type: ignore[method-assign]
    assert validation_loss(trainer, [0, 1, 2, 3])["eval/loss"] == pytest.approx(with_ema["eval/loss"], rel=1e-6)
