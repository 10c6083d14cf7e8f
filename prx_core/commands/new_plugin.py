"""``prx-run new-plugin NAME --kind KIND [--dir DIR]``: write a plugin package that works as generated.

The package (``prx-<name>``) has a ``pyproject.toml`` with the ``prx`` entry point, a torch-free
``__init__`` with a frozen ``Config``, ``INFO`` and the hook implementations for its kind, the
maths or the slot object in a sibling module, a README with the sections CONTRIBUTING.md asks
for, a unit test and prx's shared conformance suite. Each kind's implementation is small but
real (a loss term that adds a penalty, a router that keeps every token, SGD, ...), so
``pip install -e DIR && pytest DIR/tests`` passes before anything is edited.

The templates are package data in :mod:`prx_core.templates` (``new_plugin/*.tmpl``): the common
``pyproject.toml`` and ``README.md``, and one file per kind holding its ``#### FILE: <path>``
sections and the ``#### VAR: <name>`` texts the README uses. ``{{name}}``-style placeholders are
replaced; nothing else in the templates is interpreted.
"""

from __future__ import annotations

import argparse
import keyword
import re
from importlib import resources
from pathlib import Path

KINDS = ("loss", "router", "optimizer", "latent_space", "text_encoder", "metric", "data", "tracker")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
SECTION = re.compile(r"^#### (FILE|VAR): (.+)$", re.MULTILINE)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx-run new-plugin",
        description="Write a plugin package skeleton that installs and passes its tests as generated.",
    )
    parser.add_argument("name", help="the plugin's recipe name, e.g. 'my_loss' (lowercase, digits, underscores)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="what the plugin provides")
    parser.add_argument("--dir", type=Path, help="the package folder to create (default: ./prx-<name with dashes>)")
    return parser


def _template(name: str) -> str:
    return resources.files("prx_core.templates").joinpath("new_plugin", name).read_text(encoding="utf-8")


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.search(r"\{\{(\w+)\}\}", text)
    if leftover:  # a template bug, never the user's
        raise RuntimeError(f"new-plugin template leaves placeholder {leftover.group(0)} unfilled")
    return text


def _sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """A kind template's ``(files, variables)``: each section runs to the next marker."""
    files: dict[str, str] = {}
    variables: dict[str, str] = {}
    marks = list(SECTION.finditer(text))
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        body = text[mark.end() + 1 : following.start() if following else len(text)]
        if mark.group(1) == "FILE":
            files[mark.group(2).strip()] = body
        else:
            variables[mark.group(2).strip()] = body.strip()
    return files, variables


def render(name: str, kind: str) -> dict[str, str]:
    """The package's files, relative path -> text."""
    if not NAME_PATTERN.fullmatch(name) or keyword.iskeyword(name):
        raise ValueError(
            f"plugin name {name!r} must be lowercase letters, digits and underscores, starting with a letter "
            "(it is the recipe name, e.g. [plugins.my_loss], and part of the module name prx_<name>)"
        )
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
    values = {
        "name": name,
        "module": f"prx_{name}",
        "distribution": f"prx-{name.replace('_', '-')}",
        "class": "".join(part.capitalize() for part in name.split("_")),
    }
    files, variables = _sections(_fill(_template(f"{kind}.tmpl"), values))
    values.update(variables)
    files["pyproject.toml"] = _fill(_template("pyproject.toml.tmpl"), values)
    files["README.md"] = _fill(_template("README.md.tmpl"), values)
    return files


def write(name: str, kind: str, directory: Path) -> list[Path]:
    """Write the package into ``directory`` (created; refused when it exists and is not empty)."""
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; choose another --dir")
    written = []
    for rel, text in sorted(render(name, kind).items()):
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    import sys

    args = parser().parse_args(argv)
    directory = args.dir or Path(f"prx-{args.name.replace('_', '-')}")
    try:
        written = write(args.name, args.kind, directory)
    except (ValueError, FileExistsError) as err:
        print(f"prx-run new-plugin: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(f"\nnext: pip install -e {directory} && pytest {directory}/tests")
    return 0
