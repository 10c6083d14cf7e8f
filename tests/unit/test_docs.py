"""Every code block in the docs runs here: TOML blocks validate as recipes, Python blocks execute,
shell blocks name scripts, recipes and prx-run commands that exist."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from prx_core.cli import EXTERNAL_COMMANDS
from prx_core.recipe import dump_toml, load, merge_recipe

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    *sorted(ROOT.glob("docs/*.md")),
    *sorted(ROOT.glob("plugins/*/README.md")),
]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks(kind: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for i, (lang, body) in enumerate(BLOCK.findall(doc.read_text(encoding="utf-8"))):
            if lang == kind:
                found.append((f"{doc.relative_to(ROOT)}#{i}", body))
    return found


def test_docs_have_code_blocks() -> None:
    assert blocks("toml") and blocks("bash") and blocks("python")


@pytest.mark.parametrize(("where", "body"), blocks("toml"), ids=[w for w, _ in blocks("toml")])
def test_toml_blocks_are_valid_recipes(where: str, body: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    data = tomllib.loads(body)
    if "extends" in data:
        # A complete child recipe: resolve its parent among the shipped recipes.
        shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
        path = tmp_path / "recipes" / "doc_example.toml"
        path.write_text(body, encoding="utf-8")
    else:
        # A fragment: it must validate when merged into the quickstart recipe.
        with (ROOT / "recipes" / "quickstart.toml").open("rb") as fh:
            base = tomllib.load(fh)
        if data.get("data", {}).get("use", "synthetic_shapes") != "synthetic_shapes":
            base.get("metrics", {}).pop("shapes_adherence", None)  # scores synthetic shapes only
        path = tmp_path / "fragment.toml"
        path.write_text(dump_toml(merge_recipe(base, data)), encoding="utf-8")
    if "prediction_l2" in data.get("plugins", {}):
        _install_contributing_example(tmp_path / "site", monkeypatch)
        assert "prediction_l2" in load(path).plugins
        return
    load(path)


def _install_contributing_example(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make CONTRIBUTING's example plugin an installed distribution, from its own code block."""
    import sys
    import types

    code = next(body for where, body in blocks("python") if "prediction_l2" in body and "INFO" in body)
    module = types.ModuleType("prx_doc_example")
    monkeypatch.setitem(sys.modules, "prx_doc_example", module)
    exec(compile(code, "CONTRIBUTING.md", "exec"), module.__dict__)  # noqa: S102 - our own documentation
    dist = site / "prx_doc_example-0.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: prx-doc-example\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[prx]\nprediction_l2 = prx_doc_example\n")
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.parametrize(("where", "body"), blocks("python"), ids=[w for w, _ in blocks("python")])
def test_python_blocks_execute(where: str, body: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    module = types.ModuleType("doc_example")  # dataclasses need the module registered
    monkeypatch.setitem(sys.modules, "doc_example", module)
    exec(compile(body, where, "exec"), module.__dict__)  # noqa: S102 - our own documentation


def _commands(body: str) -> list[list[str]]:
    out = []
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(shlex.split(line))
    return out


def _check_external(where: str, command: str, argv: list[str]) -> None:
    """``prx-run precompute|ablate|report``: the arguments parse, and named recipes exist and load."""
    import glob
    import importlib

    module = importlib.import_module(f"prx_core.commands.{EXTERNAL_COMMANDS[command]}")
    args = module.parser().parse_args(argv)
    recipes = [args.recipe] if isinstance(getattr(args, "recipe", None), str | Path) else []
    recipes += [r for r in getattr(args, "recipes", None) or [] if str(r).endswith(".toml")]
    for recipe in recipes:
        matches = glob.glob(str(ROOT / recipe))
        assert matches, f"{where}: {recipe} does not exist"
        for match in matches:
            load(match, getattr(args, "overrides", None) or [])


@pytest.mark.parametrize(("where", "body"), blocks("bash"), ids=[w for w, _ in blocks("bash")])
def test_shell_blocks_name_things_that_exist(where: str, body: str) -> None:
    from prx_core.cli import _check_parser, _train_parser

    for words in _commands(body):
        if words[0] == "bash":
            assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
        elif words[0] == "prx-run":
            if words[1] == "plugins":
                continue
            if words[1] in ("sample", "eval", "export"):
                from prx_core import cli

                getattr(cli, f"{words[1]}_parser")().parse_args(words[2:])
                continue
            if words[1] in EXTERNAL_COMMANDS:
                _check_external(where, words[1], words[2:])
                continue
            if words[1] == "check":
                args = _check_parser().parse_args(words[2:])
                assert all((ROOT / p).exists() for p in args.paths), f"{where}: {args.paths}"
            else:
                args = _train_parser().parse_args(words[1:])
                assert (ROOT / args.recipe).is_file(), f"{where}: {args.recipe}"
                load(ROOT / args.recipe, args.overrides)
        elif words[0] == "accelerate" and words[1] == "config":
            continue  # interactive: writes the launcher's config file
        elif words[0] in ("torchrun", "accelerate"):
            assert "prx_core.cli" in words, f"{where}: launch prx through its module"
            rest = words[words.index("prx_core.cli") + 1 :]
            if rest[0] in EXTERNAL_COMMANDS:
                _check_external(where, rest[0], rest[1:])
                continue
            args = _train_parser().parse_args(rest)
            load(ROOT / args.recipe, args.overrides)
        elif words[0] in ("pip", "source", "export"):
            if words[0] == "pip" and "-e" in words:
                assert (ROOT / words[words.index("-e") + 1]).is_dir()
        else:
            raise AssertionError(f"{where}: unexpected command {words[0]!r}; teach this test about it")


def test_readme_lists_every_plugin_package() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for package in sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists()):
        assert f"`{package}`" in readme, f"README's plugin table misses {package}"
