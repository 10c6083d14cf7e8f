"""Trainer behaviour that every run relies on: dtype guard, caption dropout, text cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import prx_core.trainer as trainer_module
from prx_core.precision import PrecisionError
from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe
from prx_core.text_cache import CachedTextEncoder


def test_guard_refuses_bf16_weights_under_bf16_mixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = trainer_module.build_model

    def build_in_bf16(config, context_in_dim, dtype):
        # Simulates the silent bug: something casts the weights although the policy keeps fp32.
        return real_build(config, context_in_dim, dtype).to(torch.bfloat16)

    monkeypatch.setattr(trainer_module, "build_model", build_in_bf16)
    recipe = tiny_recipe(tmp_path, {"precision": {"use": "bf16_mixed"}})
    trainer = trainer_module.Trainer(recipe, tmp_path / "run")
    with pytest.raises(PrecisionError, match=r"at start: parameter '.*' is torch.bfloat16 .* 'bf16_mixed'"):
        trainer.setup()


def test_guard_checks_optimizer_state_after_resume(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path), tmp_path / "run")
    run_steps(trainer, 1)
    state = next(iter(trainer.optimizer.state.values()))
    state["exp_avg"] = state["exp_avg"].to(torch.bfloat16)
    with pytest.raises(PrecisionError, match="optimizer state 'exp_avg'"):
        trainer.run.precision.check(trainer.run.trainable, trainer.optimizer, "after resume")


def _record_text(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = trainer_module.denoise

    def recording(model, x, t, text, mask, *args, **kwargs):
        seen.append((text.detach().clone(), mask.clone()))
        return real(model, x, t, text, mask, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "denoise", recording)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_uses_the_cached_empty_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dropout: float
) -> None:
    seen = _record_text(monkeypatch)
    trainer = make_trainer(tiny_recipe(tmp_path, {"objective": {"caption_dropout": dropout}}), tmp_path / "run")
    run_steps(trainer, 1)
    text, mask = seen[0]
    empty_states, empty_mask = trainer.run.text_encoder.empty()
    is_empty = [torch.equal(text[i], empty_states[0].float()) and torch.equal(mask[i], empty_mask[0]) for i in range(4)]
    assert all(is_empty) if dropout == 1.0 else not any(is_empty)


def test_text_cache_is_batch_invariant_and_counts_hits(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path), tmp_path / "run")
    cache = trainer.run.text_encoder
    assert isinstance(cache, CachedTextEncoder)
    inner = cache.encoder
    pair_states, pair_mask = cache.encode(["a red circle", "a blue square"])
    alone_states, _ = inner.encode(["a blue square"])
    assert torch.equal(pair_states[1:], alone_states)
    hits = cache.hits
    cache.encode(["a blue square"])
    assert cache.hits == hits + 1


def test_seed_changes_data_and_noise(tmp_path: Path) -> None:
    a = make_trainer(tiny_recipe(tmp_path / "a"), tmp_path / "a" / "run")
    b = make_trainer(tiny_recipe(tmp_path / "b", {"seed": 1}), tmp_path / "b" / "run")
    from prx_core.slots import BatchRequest

    request = BatchRequest(step=0, micro_step=0, accumulation=1, rank=0, world_size=1, size=4, seed=0)
    assert not torch.equal(a.run.data.batch(request).images_BCHW, b.run.data.batch(request).images_BCHW)
    assert run_steps(a, 1) != run_steps(b, 1)


def test_batch_layout_is_validated_and_accumulates(tmp_path: Path) -> None:
    # 4 = 3 × accumulation × world size has no whole solution: refused by the recipe check.
    with pytest.raises(Exception, match=r"'train\.micro_batch' is 3, which does not divide train\.global_batch = 4"):
        make_trainer(tiny_recipe(tmp_path, {"train": {"micro_batch": 3}}), tmp_path / "run")
    with pytest.raises(Exception, match="not divisible by micro_batch 2 × world size 3"):
        trainer_module.batch_layout(4, 2, 3)  # divisible alone, not across 3 processes: known only at start
    trainer = make_trainer(tiny_recipe(tmp_path, {"train": {"micro_batch": 2}}), tmp_path / "run2")
    assert (trainer.micro_batch, trainer.accumulation) == (2, 2)
    assert all(torch.isfinite(torch.tensor(run_steps(trainer, 1))))
