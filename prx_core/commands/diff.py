"""``prx-run diff``: the resolved difference between two recipes or run directories.

    prx-run diff A B [--set KEY=VALUE ...]

A and B are each a recipe (a file, ``pkg:``/``ep:``/URL/``hf://`` reference) or a run directory
(its resolved ``recipe.toml``). Both are resolved (every default filled in, ``[requires]`` filled
from the plugins used) and compared key by key, one dotted key per line, sorted::

    optimizer.lr: 0.001 -> 0.0003
    plugins.ema.decay: added 0.999
    metrics.shapes_adherence: removed {}

Exit status: 0 when they resolve to the same recipe, 1 when they differ, 2 when one is invalid.
``--set`` overrides apply to both sides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prx_core.config import RecipeError

#: Marks a key that one side does not have.
_ABSENT = object()


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="prx-run diff", description="Print the resolved difference of two recipes or run directories."
    )
    out.add_argument("a", help="a recipe or a run directory")
    out.add_argument("b", help="a recipe or a run directory")
    out.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return out


def recipe_ref(ref: str) -> str:
    """A run directory stands for its resolved recipe.toml."""
    path = Path(ref)
    if path.is_dir():
        recipe_file = path / "recipe.toml"
        if not recipe_file.is_file():
            raise RecipeError(f"{path} is a folder but not a run directory: {recipe_file} is missing")
        return str(recipe_file)
    return ref


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: a -> b``, ``key: added b`` or ``key: removed a`` per differing dotted key, sorted."""
    from prx_core.commands.show import flatten, render

    flat_a, flat_b = flatten(a), flatten(b)
    lines = []
    for key in sorted(set(flat_a) | set(flat_b)):
        old, new = flat_a.get(key, _ABSENT), flat_b.get(key, _ABSENT)
        if old is _ABSENT:
            lines.append(f"{key}: added {render(new)}")
        elif new is _ABSENT:
            lines.append(f"{key}: removed {render(old)}")
        elif old != new or type(old) is not type(new):
            lines.append(f"{key}: {render(old)} -> {render(new)}")
    return lines


def main(argv: list[str]) -> int:
    from prx_core.recipe import load

    args = parser().parse_args(argv)
    try:
        a = load(recipe_ref(args.a), args.overrides).shared()
        b = load(recipe_ref(args.b), args.overrides).shared()
    except RecipeError as err:
        print(f"prx-run diff: {err}", file=sys.stderr)
        return 2
    lines = differences(a, b)
    for line in lines:
        print(line)
    if not lines:
        print(f"no difference: {args.a} and {args.b} resolve to the same recipe", file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
