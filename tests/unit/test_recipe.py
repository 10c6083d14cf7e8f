"""Recipe loading: extends, deep merge, strict validation with locations and suggestions."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from prx_core.config import RecipeError
from prx_core.recipe import deep_merge, dump_toml, load, load_raw, parse_override
from prx_core.testing.fixtures import TINY_RECIPE, write_recipe


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_deep_merge_merges_tables_and_replaces_lists() -> None:
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    top = {"a": {"y": [3]}, "c": 2}
    assert deep_merge(base, top) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # inputs untouched


def test_extends_chain_and_origin(tmp_path: Path) -> None:
    base = write_recipe(tmp_path, name="base.toml")
    child = _write(
        tmp_path / "child.toml",
        'extends = "base.toml"\nname = "child"\n[train]\nsteps = 9\n[sampling]\nprompts = ["a", "b"]\n',
    )
    raw = load_raw(child)
    assert raw.data["train"]["steps"] == 9
    assert raw.data["train"]["global_batch"] == TINY_RECIPE["train"]["global_batch"]
    assert raw.where("train.steps") == str(child)
    assert raw.where("train.global_batch") == str(base)
    recipe = load(child)
    assert recipe.name == "child" and recipe.train.steps == 9 and recipe.sampling.prompts == ("a", "b")


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    _write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    _write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="cycle"):
        load_raw(tmp_path / "a.toml")


def test_misspelled_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    write_recipe(tmp_path, name="base.toml")
    child = _write(tmp_path / "child.toml", 'extends = "base.toml"\n[train]\nglobal_bacth = 8\n')
    with pytest.raises(RecipeError) as err:
        load(child)
    message = str(err.value)
    assert str(child) in message
    assert "'train.global_bacth'" in message
    assert "did you mean 'global_batch'" in message


def test_misplaced_top_level_table_is_rejected(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"trian": {"steps": 3}})
    with pytest.raises(RecipeError, match="unknown key 'trian'; did you mean 'train'"):
        load(path)


def test_wrong_type_is_rejected_with_dotted_key(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"optimizer": {"lr": "fast"}})
    with pytest.raises(RecipeError, match=r"'optimizer.lr' must be float, got str 'fast'"):
        load(path)
    path = write_recipe(tmp_path, {"train": {"steps": 2.5}})
    with pytest.raises(RecipeError, match=r"'train.steps' must be int"):
        load(path)


def test_plugin_config_keys_are_strict(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"text_encoder": {"max_lenght": 8}})
    with pytest.raises(RecipeError, match="'text_encoder.max_lenght'; did you mean 'max_length'"):
        load(path)


def test_unknown_slot_entry_suggests(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"optimizer": {"use": "adamww"}})
    with pytest.raises(RecipeError, match="unknown optimizer 'adamww'; did you mean 'adamw'"):
        load(path)


def test_set_overrides_are_validated_and_recorded(tmp_path: Path) -> None:
    path = write_recipe(tmp_path)
    recipe = load(path, ["train.steps=7", "optimizer.lr=3e-4", "tracker.use=console"])
    assert recipe.train.steps == 7 and recipe.slot_config("optimizer").lr == 3e-4
    assert recipe.overrides == ["train.steps=7", "optimizer.lr=3e-4", "tracker.use=console"]
    with pytest.raises(RecipeError, match=r"--set: unknown key 'train.stpes'; did you mean 'steps'"):
        load(path, ["train.stpes=7"])
    with pytest.raises(RecipeError, match=r"--set: 'train.steps' must be int, got str 'many'"):
        load(path, ["train.steps=many"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("train.steps")


def test_channel_mismatch_between_latent_space_and_model(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"model": {"in_channels": 16}})
    with pytest.raises(RecipeError, match=r"in_channels' is 16 but latent space 'pixel' produces 3 channels"):
        load(path)


def test_context_dim_mismatch_and_size_divisibility(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="produces 384-d states"):
        load(write_recipe(tmp_path, {"model": {"context_in_dim": 100}}))
    with pytest.raises(RecipeError, match="not divisible"):
        load(write_recipe(tmp_path, {"data": {"size": 18}}))


def test_model_section_cross_checks(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="axes_dim"):
        load(write_recipe(tmp_path, {"model": {"axes_dim": [8, 4]}}))


def test_resolved_recipe_round_trips_through_toml(tmp_path: Path) -> None:
    recipe = load(write_recipe(tmp_path, {"data": {"caption_weights": {"long": 0.7, "short": 0.3}}}))
    text = dump_toml(recipe.resolved())
    tomllib.loads(text)
    again = _write(tmp_path / "again.toml", text)
    assert load(again).resolved() == recipe.resolved()


def test_requires_and_conflicts_are_checked_at_validation(tmp_path: Path, fake_site: Path) -> None:
    ok = load(write_recipe(tmp_path, {"plugins": {"fake_needy": {}}}))
    assert "fake_needy" in ok.plugins
    with pytest.raises(RecipeError, match=r"plugin 'fake_needy' conflicts with plugin:fake_loss"):
        load(write_recipe(tmp_path, {"plugins": {"fake_needy": {}, "fake_loss": {}}}))
    # 'fake_needy' requires pixel space; a recipe with another latent space fails before any model exists.
    from prx_core.recipe import Recipe, check_compatibility, load_raw

    recipe: Recipe = load(write_recipe(tmp_path, {"plugins": {"fake_needy": {}}}))
    recipe.slots["latent_space"] = type(recipe.slots["latent_space"])(
        "other_vae", recipe.slot_config("latent_space"), "x"
    )
    with pytest.raises(RecipeError, match=r"requires latent_space:pixel"):
        check_compatibility(recipe, load_raw(tmp_path / "recipe.toml"))


def test_unknown_plugin_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="'plugins.nope' names plugin 'nope', which is not installed"):
        load(write_recipe(tmp_path, {"plugins": {"nope": {}}}))
