"""Every code block in the docs runs here: TOML blocks validate as recipes, Python blocks execute,
shell blocks name scripts, recipes and prx-run commands that exist."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

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
    import tomli  # recipes are TOML 1.1, as prx reads them

    # Relative paths in an example (`init = "run:runs/quickstart"`) must not find the reader's own runs.
    monkeypatch.chdir(tmp_path)
    data = tomli.loads(body)
    if "extends" in data:
        # A complete child recipe: resolve its parent among the shipped recipes.
        shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
        path = tmp_path / "recipes" / "doc_example.toml"
        path.write_text(body, encoding="utf-8")
    else:
        # A fragment: it must validate when merged into the quickstart recipe.
        with (ROOT / "recipes" / "quickstart.toml").open("rb") as fh:
            base = tomli.load(fh)
        if data.get("data", {}).get("use", "synthetic_shapes") != "synthetic_shapes":
            base.get("metrics", {}).pop("shapes_adherence", None)  # scores synthetic shapes only
        # Plugin docs describe PRX's 16 blocks (TREAD's blocks 2..12, REPA's layer 7), and `check`
        # refuses block indices past model.depth: give the fragment the quickstart at that depth.
        base["model"] = {**base["model"], "depth": 16}
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
            if words[1] in ("plugins", "--help"):
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


# --------------------------------------------------------------------------- links and docs/fidelity.md

#: Every Markdown page a user reads: the docs above plus the nested docs pages and bench's.
LINKED_DOCS = [*DOCS, *sorted(ROOT.glob("docs/*/*.md")), *sorted(ROOT.glob("bench/*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where Markdown links are links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.DOTALL))


def relative_links(doc: Path) -> list[str]:
    found = [m.group(1) for m in LINK.finditer(_prose(doc.read_text(encoding="utf-8")))]
    return [t for t in found if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_resolve() -> None:
    broken = [
        f"{doc.relative_to(ROOT)}: {target}"
        for doc in LINKED_DOCS
        for target in relative_links(doc)
        if not (doc.parent / target.split("#", 1)[0]).exists()
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_link_check_sees_links_and_skips_code(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text(
        "See [a](a.md#part), ![plot](img/p.png) and [b](https://x.org/b.md), [c](#here).\n"
        "`[not](inline.md)`\n```bash\n[not](block.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(doc) == ["a.md#part", "img/p.png"]


FIDELITY = ROOT / "docs" / "fidelity.md"
FIDELITY_HEADER = "| what | the reference | prx's default | option that switches it | why |"
#: Phrases that say a value is the reference's own.
CLAIMS = re.compile(
    r"as in the (reference|public code)|as the (reference|public code)|(exactly|just) the (reference|public code)'s"
    r"|the (reference|public code)'s (value|default|setting)s?|same as the (reference|public code)"
    r"|like the (reference|public code)|matches the (reference|public code)|\bPRX value",
    re.IGNORECASE,
)
CODE = re.compile(r"`([^`\n]+)`")
PLUGIN_PACKAGES = {p.name for p in (ROOT / "plugins").iterdir() if (p / "README.md").exists()}


def fidelity_rows(text: str) -> list[dict[str, Any]]:
    """Each row of docs/fidelity.md's table: its owners (the ``prx_core`` or plugin package names
    quoted in the first cell), its cells, and prx's differing defaults (the quoted values of the
    third cell)."""
    lines = text.splitlines()
    start = lines.index(FIDELITY_HEADER) + 2  # skip the header and the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        owners = [c for c in CODE.findall(cells[0]) if c == "prx_core" or c.startswith("prx-")]
        rows.append({"cells": cells, "owners": owners, "defaults": CODE.findall(cells[2]) if len(cells) > 2 else []})
    return rows


def claim_units(text: str) -> list[str]:
    """A README cut into the pieces a claim lives in: sentences of prose, list items, table rows
    and code lines (a TOML comment can claim a value too)."""
    units: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            units.extend(re.split(r"(?<=[.;!?])\s+", " ".join(paragraph)))
            paragraph.clear()

    in_code = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            in_code = not in_code
        elif in_code or stripped.startswith("|"):
            flush()
            units.append(stripped)
        elif not stripped or stripped.startswith("#") or re.match(r"([-*]|\d+\.) ", stripped):
            flush()
            if stripped and not stripped.startswith("#"):
                paragraph.append(stripped)
        else:
            paragraph.append(stripped)
    flush()
    return units


def claims_of_listed_defaults(text: str, rows: list[dict[str, Any]]) -> list[str]:
    """The pieces of ``text`` that call one of the rows' differing defaults the reference's."""
    found = []
    for unit in claim_units(text):
        if not CLAIMS.search(unit):
            continue
        for row in rows:
            for value in row["defaults"]:
                if re.search(rf"(?<![\w./]){re.escape(value)}(?![\w.])", unit):
                    found.append(f"{value!r} ({row['cells'][0]}): {unit}")
    return found


def owner_readme(owner: str) -> Path:
    return ROOT / "README.md" if owner == "prx_core" else ROOT / "plugins" / owner / "README.md"


def test_fidelity_table_rows_are_complete() -> None:
    rows = fidelity_rows(FIDELITY.read_text(encoding="utf-8"))
    assert len(rows) >= 10
    for row in rows:
        where = row["cells"][0]
        assert len(row["cells"]) == 5 and all(row["cells"]), f"fidelity.md row {where}: five non-empty cells"
        assert row["owners"], f"fidelity.md row {where}: the first cell names no owner (`prx_core` or `prx-…`)"
        for owner in row["owners"]:
            assert owner == "prx_core" or owner in PLUGIN_PACKAGES, f"fidelity.md row {where}: no package {owner}"
        assert row["defaults"], f"fidelity.md row {where}: quote prx's default in `code`"
        option = row["cells"][3]
        assert option == "none" or CODE.search(option), f"fidelity.md row {where}: the option is `code` or none"


def test_every_plugin_readme_links_to_fidelity() -> None:
    missing = [p for p in sorted(PLUGIN_PACKAGES) if "docs/fidelity.md" not in owner_readme(p).read_text("utf-8")]
    assert not missing, f"these plugin READMEs do not link docs/fidelity.md: {missing}"


def test_no_readme_calls_a_listed_difference_the_reference_value() -> None:
    rows = fidelity_rows(FIDELITY.read_text(encoding="utf-8"))
    found = []
    for owner in sorted({o for row in rows for o in row["owners"]}):
        mine = [row for row in rows if owner in row["owners"]]
        found += [
            f"{owner_readme(owner).relative_to(ROOT)}: {c}"
            for c in claims_of_listed_defaults(owner_readme(owner).read_text(encoding="utf-8"), mine)
        ]
    assert not found, "docs/fidelity.md lists these as differences:\n" + "\n".join(found)


def test_claim_check_flags_a_listed_default_and_nothing_else() -> None:
    table = (
        f"{FIDELITY_HEADER}\n|---|---|---|---|---|\n"
        "| `prx-muon` **eps** | 1e-8 | `adamw_eps = 1e-15` | `adamw_eps` | why |\n"
    )
    rows = fidelity_rows(table)
    assert rows[0]["owners"] == ["prx-muon"] and rows[0]["defaults"] == ["adamw_eps = 1e-15"]
    readme = (
        "# prx-muon\n\nThe AdamW group uses `adamw_eps = 1e-15`, the PRX value.\n\n"
        "- Momentum 0.95, as in the reference. The default `adamw_eps = 1e-15` differs.\n\n"
        "```toml\nadamw_eps = 1e-15   # as the reference\nadamw_eps = 1e-150   # as the reference\n```\n"
    )
    found = claims_of_listed_defaults(readme, rows)
    assert len(found) == 2, found
    assert "the PRX value" in found[0] and "# as the reference" in found[1] and "1e-150" not in found[1]
