"""Recipe-level checks (``prx_check_recipe``): what ``prx-run check`` refuses before any model exists.

The bad-recipe corpus (tests/fixtures/bad_recipes, run by test_reliability.py) holds one refused
recipe per check; here are the boundaries (the last valid value passes), the text widths read from
a local ``config.json``, and the file each error names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prx_core.config import RecipeError
from prx_core.recipe import load
from prx_core.testing.fixtures import write_recipe

TINY_DEPTH = 2  # prx_core.testing.fixtures.TINY_RECIPE's model.depth


def test_router_span_up_to_the_last_block_passes(tmp_path: Path) -> None:
    for router in ("tread", "sprint"):
        load(write_recipe(tmp_path, {"router": {"use": router, "start": 0, "end": TINY_DEPTH - 1}}))
        with pytest.raises(RecipeError, match=r"'router\.end' is 2, but model\.depth = 2 has blocks 0\.\.1"):
            load(write_recipe(tmp_path, {"router": {"use": router, "start": 0, "end": TINY_DEPTH}}))


@pytest.mark.parametrize("plugin", ["repa", "irepa"])
def test_alignment_layer_up_to_the_last_block_passes(tmp_path: Path, plugin: str) -> None:
    load(write_recipe(tmp_path, {"plugins": {plugin: {"layer": TINY_DEPTH - 1}}}))
    with pytest.raises(RecipeError, match=rf"'plugins\.{plugin}\.layer' is 2, but model\.depth = 2"):
        load(write_recipe(tmp_path, {"plugins": {plugin: {"layer": TINY_DEPTH}}}))


def test_irepa_conv_projector_inside_a_routed_span_is_refused_by_check(tmp_path: Path) -> None:
    routed = {"router": {"use": "tread", "start": 0, "end": 1}}
    with pytest.raises(RecipeError, match=r"'plugins\.irepa\.layer' is 1, inside the token router's span"):
        load(write_recipe(tmp_path, {**routed, "plugins": {"irepa": {"layer": 1}}}))
    load(write_recipe(tmp_path, {**routed, "plugins": {"irepa": {"layer": 1, "projector": "attention"}}}))


@pytest.mark.parametrize(("global_batch", "micro_batch"), [(12, 4), (12, 8), (12, 12), (12, 5), (8, 16), (30, 8)])
def test_batch_split_is_refused_exactly_when_no_world_size_fits(
    tmp_path: Path, global_batch: int, micro_batch: int
) -> None:
    # Written out: some world size w gives whole micro-batches iff global = micro × accumulation × w.
    fits = any(global_batch % (micro_batch * w) == 0 for w in range(1, global_batch + 1))
    path = write_recipe(tmp_path, {"train": {"global_batch": global_batch, "micro_batch": micro_batch}})
    if fits:
        load(path)
    else:
        with pytest.raises(RecipeError, match=rf"'train\.micro_batch' is {micro_batch}, which does not divide"):
            load(path)


def _model_dir(tmp_path: Path, config: dict[str, object], subfolder: str = "") -> Path:
    """A model folder with only a ``config.json``: all a recipe check reads (no weights, no download)."""
    folder = tmp_path / "model" / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path / "model"


@pytest.mark.parametrize(
    ("encoder", "config"),
    [
        ("t5gemma", {"model_type": "t5gemma", "encoder": {"hidden_size": 48}}),
        ("t5gemma", {"model_type": "t5_gemma_module", "hidden_size": 48}),
        ("qwen3vl", {"model_type": "qwen3_vl", "text_config": {"hidden_size": 48}}),
        ("qwen3vl", {"model_type": "qwen3_vl_text", "hidden_size": 48}),
    ],
)
def test_text_width_is_read_from_a_local_config(tmp_path: Path, encoder: str, config: dict[str, object]) -> None:
    model = _model_dir(tmp_path, config, subfolder="text_encoder")
    table = {"use": encoder, "path": str(model), "subfolder": "text_encoder", "max_length": 8}
    load(write_recipe(tmp_path, {"text_encoder": {**table, "dim": 48}}))
    with pytest.raises(RecipeError) as err:
        load(write_recipe(tmp_path, {"text_encoder": {**table, "dim": 64}}))
    message = str(err.value)
    assert f"'text_encoder.dim' is 64, but {encoder}'s weights" in message
    assert str(model / "text_encoder" / "config.json") in message and "set text_encoder.dim = 48" in message


def test_minilm_width_comes_from_its_bundled_weights(tmp_path: Path) -> None:
    load(write_recipe(tmp_path, {"text_encoder": {"dim": 384}}))  # all-MiniLM-L6-v2 is 384-d
    with pytest.raises(RecipeError, match=r"'text_encoder\.dim' is 512, but minilm's weights .* produce 384-d"):
        load(write_recipe(tmp_path, {"text_encoder": {"dim": 512}}))


def test_a_hub_encoder_in_the_local_cache_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hub" / "models--prx-tests--tiny-qwen3vl"
    snapshot = repo / "snapshots" / ("a" * 40)
    (snapshot / "text_encoder").mkdir(parents=True)
    (snapshot / "text_encoder" / "config.json").write_text('{"model_type": "qwen3_vl_text", "hidden_size": 48}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    table = {"use": "qwen3vl", "path": "prx-tests/tiny-qwen3vl", "subfolder": "text_encoder", "max_length": 8}
    load(write_recipe(tmp_path, {"text_encoder": {**table, "dim": 48}}))
    with pytest.raises(RecipeError, match=r"'text_encoder\.dim' is 2048, but qwen3vl's weights .* produce 48-d"):
        load(write_recipe(tmp_path, {"text_encoder": table}))  # the default dim, 2048


def test_an_uncached_hub_encoder_is_not_checked_and_nothing_downloads(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE=1 (tests/conftest.py): a download attempt would fail; the check just has no opinion.
    table = {"use": "qwen3vl", "path": "prx-tests/not-a-real-model", "dim": 48, "max_length": 8}
    load(write_recipe(tmp_path, {"text_encoder": table}))


def test_the_error_names_the_file_that_set_the_key(tmp_path: Path) -> None:
    write_recipe(tmp_path, {"router": {"use": "tread", "start": 0, "end": 1}}, name="parent.toml")
    child = tmp_path / "child.toml"
    child.write_text('extends = "parent.toml"\n[router]\nend = 5\n[train]\nmicro_batch = 3\n', encoding="utf-8")
    with pytest.raises(RecipeError) as err:
        load(child)
    assert str(err.value).startswith(f"{child.resolve()}: 'train.micro_batch' is 3")
    child.write_text('extends = "parent.toml"\n[router]\nend = 5\n', encoding="utf-8")
    with pytest.raises(RecipeError) as err:
        load(child)
    assert str(err.value) == (
        f"{child.resolve()}: 'router.end' is 5, but model.depth = 2 has blocks 0..1; "
        "the routed span start..end is inclusive"
    )


def test_every_problem_is_reported_in_one_line_sorted(tmp_path: Path) -> None:
    patch = {"router": {"use": "tread", "start": 0, "end": 4}, "plugins": {"repa": {"layer": 3}}}
    with pytest.raises(RecipeError) as err:
        load(write_recipe(tmp_path, patch))
    message, where = str(err.value), str(tmp_path / "recipe.toml")
    assert "\n" not in message
    assert message.startswith(f"{where}: 'plugins.repa.layer' is 3, but model.depth = 2 has blocks 0..1; ")
    assert f"; {where}: 'router.end' is 4, but model.depth = 2" in message
