"""``[[stages]]``: each stage's effective recipe, and the errors a bad stage table gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from prx_core.config import RecipeError
from prx_core.recipe import dump_toml, load
from prx_core.testing.fixtures import write_recipe

TWO_STAGES = {
    "plugins": {"contrastive_fm": {}},
    "stages": [
        {"name": "low-res", "steps": 3, "data": {"size": 16}},
        {
            "name": "high-res",
            "steps": 2,
            "remove": ["plugins.contrastive_fm"],
            "train": {"global_batch": 2},
            "data": {"size": 32, "caption_weights": {"long": 0.5, "short": 0.5}},
        },
    ],
}


def test_each_stage_gets_its_own_effective_recipe(tmp_path: Path) -> None:
    recipe = load(write_recipe(tmp_path, TWO_STAGES))
    first, second = recipe.stages
    assert recipe.train.steps == 5  # the run's total
    assert (first.first_step, first.last_step, second.first_step, second.last_step) == (0, 3, 3, 5)
    assert first.recipe.train.steps == 3 and second.recipe.train.steps == 5
    assert first.recipe.slot_config("data").size == 16 and second.recipe.slot_config("data").size == 32
    assert dict(second.recipe.slot_config("data").caption_weights) == {"long": 0.5, "short": 0.5}
    assert "contrastive_fm" in first.recipe.plugins and "contrastive_fm" not in second.recipe.plugins
    assert second.recipe.train.global_batch == 2 and first.recipe.train.global_batch == 4
    assert [s.dir_name for s in recipe.stages] == ["1-low-res", "2-high-res"]
    assert not first.recipe.stages  # a stage's recipe is a plain one-stage recipe


def test_set_overrides_win_in_every_stage_and_address_one_stage(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, TWO_STAGES)
    recipe = load(path, ["train.global_batch=1", "stages.0.steps=7", "stages.1.data.size=64"])
    first, second = recipe.stages
    assert first.recipe.train.global_batch == 1 and second.recipe.train.global_batch == 1
    assert (first.last_step, second.last_step) == (7, 9)
    assert second.recipe.slot_config("data").size == 64


def test_resolved_staged_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load(write_recipe(tmp_path, TWO_STAGES))
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(recipe.resolved()), encoding="utf-8")
    reloaded = load(again)
    assert [(s.name, s.last_step) for s in reloaded.stages] == [("low-res", 3), ("high-res", 5)]
    assert reloaded.stages[1].recipe.resolved() == recipe.stages[1].recipe.resolved()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "non-empty array"),
        ([{"name": "a", "steps": 0}], "'steps' must be an int >= 1"),
        ([{"name": "a b", "steps": 1}], "'name' must be"),
        ([{"name": "a", "steps": 1}, {"name": "a", "steps": 1}], "used twice"),
        ([{"name": "a", "steps": 1, "trian": {}}], "unknown key 'trian'; did you mean 'train'"),
        ([{"name": "a", "steps": 1, "remove": ["plugins.ema"]}], "cannot remove 'plugins.ema'"),
        ([{"name": "a", "steps": 1, "data": {"size": 17}}], "stage 1 ('a')"),
    ],
)
def test_bad_stage_tables_are_named(tmp_path: Path, stages: list, message: str) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(write_recipe(tmp_path, {"stages": stages}))


def test_override_index_out_of_range_is_clear(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="'stages' has 2 entries"):
        load(write_recipe(tmp_path, TWO_STAGES), ["stages.5.steps=1"])


def test_a_slot_that_switches_entry_keeps_only_the_settings_the_new_entry_has(tmp_path: Path) -> None:
    parent = write_recipe(
        tmp_path, {"optimizer": {"use": "adamw", "lr": 3e-3, "betas": [0.8, 0.9]}, "precision": {"use": "fp32"}}
    )
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{parent.name}"\n[optimizer]\nlr = 2e-3\n')
    same = load(child).slot_config("optimizer")
    assert same.lr == 2e-3 and tuple(same.betas) == (0.8, 0.9)  # same entry: merged
    # Another entry: the fields it shares (lr) carry over; the others (AdamW's betas) are dropped.
    child.write_text(f'extends = "{parent.name}"\n[precision]\nuse = "bf16_weights"\n')
    assert load(child).slots["precision"].use == "bf16_weights"
    child.write_text(f'extends = "{parent.name}"\n[optimizer]\nuse = "muon"\n')
    muon = load(child)
    assert muon.slots["optimizer"].use == "muon" and muon.slot_config("optimizer").lr == 3e-3
    assert "betas" not in muon.resolved()["optimizer"] or tuple(muon.resolved()["optimizer"]["betas"]) != (0.8, 0.9)
    # A key written for the new entry is still checked strictly.
    child.write_text(f'extends = "{parent.name}"\n[optimizer]\nuse = "muon"\nbetaz = 1\n')
    with pytest.raises(RecipeError, match="betaz"):
        load(child)
    # The same through --set, and through a stage table.
    assert load(parent, ["optimizer.use=muon"]).slot_config("optimizer").lr == 3e-3


def test_a_stage_remove_wins_over_a_set_override(tmp_path: Path) -> None:
    recipe = load(write_recipe(tmp_path, TWO_STAGES), ["plugins.contrastive_fm.weight=0.1"])
    first, second = recipe.stages
    assert first.recipe.plugins["contrastive_fm"].weight == 0.1
    assert "contrastive_fm" not in second.recipe.plugins
