"""The study's recipes: every shipped recipe checks, every ablation changes one thing, names are
distinct, references name published rows, non-default values carry a reason, and the commands in
docs/study.md are valid.

The one-change rule, precisely. A family is a parent recipe and the folder of recipes extending it
(``ablations/`` → ``baseline.toml``, ``pixel_1024/`` → ``pixel_1024.toml``, ``mini/`` →
``mini/baseline.toml``). A child's own file (read raw, before ``extends`` merges anything) may set,
besides the metadata keys ``name``, ``description`` and ``reference``, exactly one *unit*: a
top-level table (a slot such as ``[objective]``, or a core section such as ``[data]``), one
``[plugins.<name>]`` table or one ``[metrics.<name>]`` table. Two things may come with it:

* ``[model]`` keys that follow the latent space's tensor shape (``in_channels``, ``patch_size``,
  ``bottleneck_size``), together with a ``[latent_space]`` change, and only when ``prx-run check``
  refuses the recipe without them (so they are forced by the one change, not a second change);
* the documented exceptions in :data:`EXCEPTIONS`, each with its reason.

The resolved recipe must differ from the parent's in that unit (a no-op "change" is refused) and
nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from prx_core.config import RecipeError
from prx_core.published import PUBLISHED
from prx_core.recipe import (
    CORE_SECTIONS,
    SLOT_DEFAULTS,
    RawRecipe,
    Recipe,
    deep_merge,
    dump_toml,
    load,
    load_raw,
    validate,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
STUDY_DOC = ROOT / "docs" / "study.md"
ALL_RECIPES = sorted(RECIPES.rglob("*.toml"))

#: Family folder -> its parent, as the children's ``extends`` spells it.
FAMILIES = {"ablations": "../baseline.toml", "pixel_1024": "../pixel_1024.toml", "mini": "baseline.toml"}
#: Files inside a family folder that are the family's parent, not one of its ablations.
FAMILY_PARENTS = {"mini/baseline.toml"}
#: Family folder -> the reference.md §5 table its children's references point into.
FAMILY_TABLES = {"ablations": "latent_256", "pixel_1024": "pixel_1024", "mini": "latent_256"}
#: Top-level keys that describe a recipe without changing what it trains.
METADATA = ("extends", "name", "description", "reference")
#: ``[model]`` keys that follow the latent space's tensor shape.
SHAPE_KEYS = {"in_channels", "patch_size", "bottleneck_size"}
#: Documented exceptions to the one-change rule: file -> (the units it changes, why).
EXCEPTIONS: dict[str, tuple[set[str], str]] = {
    "ablations/repa_e_vae.toml": (
        {"latent_space", "plugins.repa"},
        "reference.md §5 publishes the REPA-E VAE only together with REPA ('REPA-E VAE (+REPA)')",
    ),
}
#: The mini-study's recipes (docs/study.md explains why REPA is not among them).
MINI = {"baseline", "short_captions", "bf16_weights", "x_prediction", "contrastive_fm", "ema", "muon", "tread"}


@functools.cache
def loaded(path: Path) -> Recipe:
    """The validated recipe (cached: several tests read the same files; nobody mutates them)."""
    return load(path)


def rel(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


def children() -> list[Path]:
    return [p for folder in FAMILIES for p in sorted((RECIPES / folder).glob("*.toml")) if rel(p) not in FAMILY_PARENTS]


def raw_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def units(table: dict[str, Any]) -> set[str]:
    """The units a raw recipe file sets: top-level tables, ``plugins.<x>``, ``metrics.<x>``, scalars."""
    out: set[str] = set()
    for key, value in table.items():
        if key in METADATA:
            continue
        if key in ("plugins", "metrics") and isinstance(value, dict):
            out |= {f"{key}.{sub}" for sub in value}
        else:
            out.add(key)
    return out


def unit_value(resolved: dict[str, Any], unit: str) -> Any:
    value: Any = resolved
    for part in unit.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def resolved_units(resolved: dict[str, Any]) -> set[str]:
    return units(resolved)


def parent_of(path: Path) -> Path:
    return (path.parent / FAMILIES[path.parent.name]).resolve()


# --------------------------------------------------------------------------- every recipe checks


def test_every_shipped_recipe_passes_prx_run_check(capsys: pytest.CaptureFixture[str]) -> None:
    from prx_core.cli import main

    code = main(["check", str(RECIPES)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"{len(ALL_RECIPES)} ok, 0 failed" in out


@pytest.mark.parametrize("path", ALL_RECIPES, ids=rel)
def test_recipe_loads(path: Path) -> None:
    load(path)


def test_the_study_recipes_exist() -> None:
    names = {rel(p) for p in ALL_RECIPES}
    assert {"baseline.toml", "pixel_1024.toml", "speedrun.toml", "quickstart.toml"} <= names
    assert {p.stem for p in (RECIPES / "mini").glob("*.toml")} == MINI
    references = {loaded(p).reference for p in ALL_RECIPES if "mini" not in p.parts}
    for key, row in PUBLISHED.items():  # every published row has a recipe that reproduces it
        assert key in references, f"no recipe reproduces reference.md §5 row {key} ({row.experiment})"


def test_run_names_are_distinct() -> None:
    """Each recipe's name is its run directory (runs/<name>): shared names overwrite (reference.md §7.5)."""
    names: dict[str, Path] = {}
    for path in ALL_RECIPES:
        name = loaded(path).name
        assert name not in names, f"{rel(path)} and {rel(names[name])} are both named '{name}'"
        names[name] = path
    assert all(loaded(p).name.startswith("mini-") for p in (RECIPES / "mini").glob("*.toml"))


# --------------------------------------------------------------------------- the one-change rule


@pytest.mark.parametrize("path", children(), ids=rel)
def test_ablation_extends_its_family_parent(path: Path) -> None:
    assert raw_toml(path).get("extends") == FAMILIES[path.parent.name]


@pytest.mark.parametrize("path", children(), ids=rel)
def test_ablation_changes_one_thing(path: Path) -> None:
    own = units(raw_toml(path))
    expected, _why = EXCEPTIONS.get(rel(path), (None, ""))
    if expected is not None:
        assert own == expected, f"{rel(path)} is a documented exception changing exactly {sorted(expected)}"
        return
    if "model" in own:
        model_keys = set(raw_toml(path)["model"])
        assert model_keys <= SHAPE_KEYS, f"{rel(path)}: [model] may only follow the latent shape, got {model_keys}"
        assert "latent_space" in own, f"{rel(path)}: [model] changes only come with a [latent_space] change"
        # ... and only because check demands them: without them the recipe must be refused.
        parent = load_raw(parent_of(path))
        child = {k: v for k, v in raw_toml(path).items() if k not in ("extends", "model")}
        with pytest.raises(RecipeError, match="model"):
            validate(RawRecipe(deep_merge(parent.data, child), parent.origin, path))
        own = own - {"model"}
    assert len(own) == 1, f"{rel(path)} changes {sorted(own)}; an ablation changes one thing"


@pytest.mark.parametrize("path", children(), ids=rel)
def test_ablation_changes_its_unit_and_nothing_else(path: Path) -> None:
    parent = loaded(parent_of(path)).resolved()
    child = loaded(path).resolved()
    own = units(raw_toml(path))
    for unit in own:
        assert unit_value(child, unit) != unit_value(parent, unit), f"{rel(path)}: [{unit}] changes nothing"
    differing = {
        u for u in resolved_units(child) | resolved_units(parent) if unit_value(child, u) != unit_value(parent, u)
    }
    assert differing <= own, f"{rel(path)} also changes {sorted(differing - own)}"


def test_exceptions_are_few_and_documented() -> None:
    for path, (changed, why) in EXCEPTIONS.items():
        assert (RECIPES / path).is_file() and len(changed) == 2 and why
        assert "exception" in (RECIPES / path).read_text(encoding="utf-8")  # the recipe says so too


@pytest.mark.parametrize("path", children(), ids=rel)
def test_reference_names_the_published_row_of_the_same_experiment(path: Path) -> None:
    reference = loaded(path).reference
    table = FAMILY_TABLES[path.parent.name]
    key = f"{table}/{path.stem}"
    if key in PUBLISHED:
        assert reference == key
    else:
        assert reference == "", f"{rel(path)} reproduces no reference.md §5 row but says reference = {reference!r}"


# --------------------------------------------------------------------------- reasons for values


def _field_defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def defaults_of(path: Path, table: str) -> dict[str, Any]:
    """Default values of a table's keys, from the dataclass the recipe binds it to."""
    recipe = loaded(path)
    if table == "":
        return {"seed": 42}
    if table in CORE_SECTIONS:
        return _field_defaults(CORE_SECTIONS[table])
    if table in recipe.slots:
        return {"use": SLOT_DEFAULTS.get(table), **_field_defaults(type(recipe.slots[table].config))}
    kind, _, name = table.partition(".")
    if kind == "plugins" and recipe.plugins.get(name) is not None:
        return _field_defaults(type(recipe.plugins[name]))
    if kind == "metrics" and name in recipe.metrics:
        return _field_defaults(type(recipe.metrics[name].config))
    return {}


ASSIGNMENT = re.compile(r"^([A-Za-z0-9_]+)\s*=\s*(.*)$")
#: Recipes outside the study (the quickstart is the README's, with its own explanations).
NOT_STUDY = {"quickstart.toml"}


def has_comment(value_text: str) -> bool:
    """A ``#`` outside double-quoted strings (the study's recipes use no single-quoted strings)."""
    in_string = escaped = False
    for char in value_text:
        if in_string and char == "\\" and not escaped:
            escaped = True
            continue
        if char == '"' and not escaped:
            in_string = not in_string
        elif char == "#" and not in_string:
            return True
        escaped = False
    return False


@pytest.mark.parametrize("path", [p for p in ALL_RECIPES if rel(p) not in NOT_STUDY], ids=rel)
def test_every_non_default_value_has_a_one_line_reason(path: Path) -> None:
    """A recipe rule: a value that differs from its plugin's default carries a comment saying why
    (on its line, or on the comment line just above it)."""
    table = ""
    previous = ""
    missing = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("[["):
            table = "[[stages]]"
        elif stripped.startswith("["):
            table = stripped.split("]")[0].strip("[ ")
        elif (match := ASSIGNMENT.match(stripped)) and match.group(1) not in (*METADATA, "name"):
            key = match.group(1)
            value = tomllib.loads(f"v = {match.group(2)}")["v"]  # the comment, if any, is dropped here
            commented = has_comment(match.group(2)) or previous.startswith("#")
            if table == "[[stages]]":
                needs = key != "name"
            else:
                defaults = defaults_of(path, table)
                needs = key not in defaults or _plain(defaults[key]) != _plain(value)
            if needs and not commented:
                missing.append(f"[{table}] {key}")
        previous = stripped
    assert not missing, f"{rel(path)}: non-default values without a reason: {', '.join(missing)}"


# --------------------------------------------------------------------------- speedrun


def test_speedrun_is_two_stages_as_in_spec() -> None:
    recipe = load(RECIPES / "speedrun.toml")
    first, second = recipe.stages
    assert (first.name, first.last_step, second.name, second.last_step) == ("512px", 100_000, "1024px", 120_000)
    assert (first.recipe.train.global_batch, first.recipe.slot_config("data").size) == (1024, 512)
    assert (second.recipe.train.global_batch, second.recipe.slot_config("data").size) == (512, 1024)
    assert "repa" in first.recipe.plugins and "repa" not in second.recipe.plugins
    for stage in (first, second):
        r = stage.recipe
        assert r.slots["objective"].use == "x_prediction" and r.slot_config("objective").shift == 3.0
        assert (r.model.in_channels, r.model.patch_size, r.model.bottleneck_size) == (3, 32, 256)
        assert r.slots["optimizer"].use == "muon" and r.slot_config("optimizer").lr == 1e-4
        assert r.slots["router"].use == "tread" and r.slot_config("router").self_guidance > 0
        assert {"lpips", "perceptual_dino", "ema"} <= set(r.plugins)
        assert r.train.device == "cuda"


def test_speedrun_refuses_quickly_without_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    import torch

    from prx_core.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists: the speedrun would start")
    import prx_core.stages  # noqa: F401 - imported up front: the refusal is timed, not the imports

    started = time.perf_counter()
    assert main([str(RECIPES / "speedrun.toml"), "--run-dir", str(tmp_path / "run")]) == 1
    assert time.perf_counter() - started < 10
    assert "train.device is 'cuda' but no CUDA device is available" in capsys.readouterr().err


# --------------------------------------------------------------------------- docs/study.md


BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def study_blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(STUDY_DOC.read_text(encoding="utf-8")) if lang == kind]


def test_study_doc_exists_with_commands() -> None:
    assert study_blocks("bash"), "docs/study.md shows how to run the study"


def test_study_doc_commands_are_valid() -> None:
    """Every shell line in docs/study.md parses and names recipes that load with their overrides."""
    from prx_core.cli import _check_parser, _train_parser
    from prx_core.commands import ablate, report

    for body in study_blocks("bash"):
        for line in body.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            words = shlex.split(line)
            if words[0] == "torchrun":
                assert "prx_core.cli" in words
                words = ["prx-run", *words[words.index("prx_core.cli") + 1 :]]
            assert words[0] in ("prx-run", "export", "pip"), line
            if words[0] != "prx-run":
                continue
            if words[1] == "check":
                args = _check_parser().parse_args(words[2:])
                assert all((ROOT / p).exists() for p in args.paths), line
            elif words[1] == "ablate":
                ablate.parser().parse_args([part for w in words[2:] for part in _expand(w).split()])
            elif words[1] == "report":
                report.parser().parse_args(words[2:])
            elif words[1] in ("sample", "eval", "export"):
                from prx_core import cli

                getattr(cli, f"{words[1]}_parser")().parse_args(words[2:])
            else:
                args = _train_parser().parse_args(words[1:])
                load(ROOT / args.recipe, args.overrides)


def _expand(word: str) -> str:
    """A shell glob over recipes, as the shell would expand it (relative to the repository)."""
    if "*" in word:
        return " ".join(p.relative_to(ROOT).as_posix() for p in sorted(ROOT.glob(word)))
    return word


def test_study_doc_ablate_commands_plan_valid_runs(tmp_path: Path) -> None:
    from prx_core.commands import ablate

    for body in study_blocks("bash"):
        for line in body.splitlines():
            words = shlex.split(line.split("#", 1)[0])
            if words[:2] != ["prx-run", "ablate"]:
                continue
            expanded = [part for w in words[2:] for part in _expand(w).split()]
            args = ablate.parser().parse_args(expanded)
            args.recipes = [ROOT / p for p in args.recipes]
            args.runs_root = tmp_path / "runs"
            assert ablate.plan(args), line


def test_study_doc_toml_blocks_are_valid(tmp_path: Path) -> None:
    for i, body in enumerate(study_blocks("toml")):
        data = tomllib.loads(body)
        base = load_raw(RECIPES / "quickstart.toml").data
        path = tmp_path / f"block{i}.toml"
        path.write_text(dump_toml(deep_merge(base, {k: v for k, v in data.items() if k != "extends"})))
        load(path)
