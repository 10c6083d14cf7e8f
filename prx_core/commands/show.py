"""``prx-run show``: a resolved recipe, each key with the file (or ``--set``) that set it.

    prx-run show RECIPE [--set KEY=VALUE ...]

RECIPE is a recipe reference (a file, ``pkg:``/``ep:``/URL/``hf://``) or a run directory (its
resolved ``recipe.toml``, where every value was written by that file).

Like ``git config --show-origin``: one line per resolved key, ``ORIGIN<TAB>KEY = VALUE``, where
ORIGIN is ``file:PATH`` for a local file (relative to the working directory when inside it), the
``pkg:``/``ep:``/URL/``hf://`` reference of a shared one, ``--set`` for an override, ``default``
for a value nobody wrote, ``model.init`` for an architecture key taken from the checkpoint
``[model] init`` names, and ``installed`` for a ``[requires]`` entry filled from the plugins the
recipe uses. The lines are preceded by one comment line per source file with its sha256.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

from prx_core.config import RecipeError


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="prx-run show", description="Print a resolved recipe with the origin of every key."
    )
    out.add_argument("recipe", help="a recipe file, pkg:/ep: reference, URL, hf:// reference or run directory")
    out.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return out


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested tables; ``[[stages]]`` entries as ``stages[i].key``; an empty table as ``{}``."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{dotted}.") if value else {dotted: {}})
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{dotted}[{i}]."))
        else:
            out[dotted] = value
    return out


def label(source: str) -> str:
    """``file:recipes/x.toml`` for a local file, the reference itself otherwise."""
    from prx_core.recipe_sources import is_remote

    if source in ("--set", "default") or is_remote(source):
        return source
    relative = os.path.relpath(source)
    return f"file:{source if relative.startswith('..') else relative}"


def origins(recipe: Any, raw: Any) -> list[tuple[str, str, Any]]:
    """(origin, dotted key, value) for every key of ``recipe.shared()``."""
    from prx_core.recipe import config_fields

    own_requires = set(recipe.requires)
    rows = []
    for key, value in flatten(recipe.shared()).items():
        lookup = key
        if key.startswith("stages["):
            lookup = "stages"
        source = raw.origin.get(lookup)
        if source is None and key.startswith("requires.") and key.removeprefix("requires.") not in own_requires:
            source = "installed"
        elif source is None and recipe.model.init and key.removeprefix("model.") in config_fields(type(recipe.model)):
            source = "model.init"
        if source is None:
            source = "default"
        elif source not in ("installed", "model.init"):
            source = label(source)
        rows.append((source, key, value))
    return rows


def render(value: Any) -> str:
    from prx_core.recipe import _toml_value

    return "{}" if isinstance(value, Mapping) and not value else _toml_value(value)


def main(argv: list[str]) -> int:
    from prx_core.commands.diff import recipe_ref
    from prx_core.recipe import load_with_origins

    args = parser().parse_args(argv)
    try:
        recipe, raw = load_with_origins(recipe_ref(args.recipe), args.overrides)
    except RecipeError as err:
        print(f"prx-run show: {err}", file=sys.stderr)
        return 2
    for entry in recipe.sources:
        commit = f" commit {entry['commit']}" if "commit" in entry else ""
        print(f"# source {label(entry['source'])} sha256 {entry['sha256']}{commit}")
    rows = origins(recipe, raw)
    width = max(len(origin) for origin, _, _ in rows)
    for origin, key, value in rows:
        print(f"{origin:<{width}}\t{key} = {render(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
