"""Recipe sharing: recipes from packages, entry points, URLs and a Hub cache; ``[requires]``; top-level
``remove``; per-key origins (``prx-run show``), ``prx-run diff``; TOML 1.1; error attribution."""

from __future__ import annotations

import ast
import copy
import hashlib
import http.server
import json
import sys
import threading
import tomllib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import tomli

from prx_core.commands import diff as diff_command
from prx_core.commands import show as show_command
from prx_core.config import RecipeError
from prx_core.plugin_index import KNOWN_PLUGIN_DISTRIBUTIONS, scan
from prx_core.recipe import dump_toml, load, load_with_origins
from prx_core.recipe_sources import changed_sources
from prx_core.rundir import write_run_files
from prx_core.testing.fixtures import TINY_RECIPE

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "fixtures" / "bad_recipes"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

#: The shared recipe's child: TOML 1.1 (a multi-line inline table with a trailing comma), which
#: Python's tomllib (TOML 1.0) refuses.
CHILD_TOML = """\
extends = "base.toml"
name = "shared-child"

[optimizer]
lr = 3e-4

[data]
caption_weights = {
    long = 0.8,
    short = 0.2,
}
"""


def base_toml() -> str:
    return dump_toml(copy.deepcopy(TINY_RECIPE))


def write_shared(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(base_toml(), encoding="utf-8")
    (folder / "child.toml").write_text(CHILD_TOML, encoding="utf-8")
    return folder / "child.toml"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- sources


@pytest.fixture
def recipe_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A tiny installed package ``prx_recipes_demo`` holding the shared recipe under ``shared/``,
    whose distribution names it under the ``prx.recipes`` entry-point group as ``demo``."""
    site = tmp_path / "site"
    package = site / "prx_recipes_demo"
    write_shared(package / "shared")
    (package / "__init__.py").write_text("", encoding="utf-8")
    info = site / "prx_recipes_demo-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prx-recipes-demo\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[prx.recipes]\ndemo = prx_recipes_demo\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("prx_recipes_demo", None)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving a folder; yields (base URL, folder)."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local Hub cache with repo alice/prx-recipes at COMMIT (``refs/main`` -> COMMIT), offline.

    The layout is huggingface_hub's documented one: models--<owner>--<repo>/snapshots/<commit>/<path>
    and refs/<branch> holding the commit.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--alice--prx-recipes"
    write_shared(repo / "snapshots" / COMMIT / "recipes")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_package_and_entry_point_references_resolve_extends_inside_the_package(recipe_package: Path) -> None:
    by_package = load("pkg:prx_recipes_demo/shared/child.toml")
    by_entry_point = load("ep:demo/shared/child.toml")
    assert by_package.resolved() == by_entry_point.resolved()
    assert by_package.slot_config("optimizer").lr == 3e-4
    assert [s["source"] for s in by_entry_point.sources] == ["ep:demo/shared/child.toml", "ep:demo/shared/base.toml"]
    with pytest.raises(RecipeError, match=r"no installed distribution names 'dem'.*did you mean 'demo'"):
        load("ep:dem/shared/child.toml")
    with pytest.raises(RecipeError, match="has no file 'shared/nope.toml'"):
        load("pkg:prx_recipes_demo/shared/nope.toml")


def test_url_is_downloaded_once_into_a_content_addressed_cache_and_works_offline(
    http_root: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, folder = http_root
    write_shared(folder / "team")
    monkeypatch.setenv("PRX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("PRX_OFFLINE", raising=False)
    url = f"{base_url}/team/child.toml"
    online = load(url)
    assert [s["source"] for s in online.sources] == [url, f"{base_url}/team/base.toml"]  # relative extends
    blob = tmp_path / "cache" / "recipes" / "blobs" / sha(CHILD_TOML)
    assert blob.read_text() == CHILD_TOML  # stored under the sha256 of its content
    # Once cached, the server's content no longer matters, and offline works.
    (folder / "team" / "child.toml").write_text("garbage = [", encoding="utf-8")
    monkeypatch.setenv("PRX_OFFLINE", "1")
    assert load(url).resolved() == online.resolved()
    with pytest.raises(RecipeError, match="not in the recipe cache .* and offline"):
        load(f"{base_url}/team/other.toml")


def test_hub_file_is_read_from_the_local_cache_offline(hub_cache: Path) -> None:
    recipe = load("hf://alice/prx-recipes/recipes/child.toml")
    assert recipe.sources[0]["commit"] == COMMIT
    assert recipe.sources[1]["source"] == "hf://alice/prx-recipes/recipes/base.toml"  # same repo and revision
    pinned = load(f"hf://alice/prx-recipes/recipes/child.toml@{COMMIT}")
    assert pinned.sources[1]["source"] == f"hf://alice/prx-recipes/recipes/base.toml@{COMMIT}"
    assert pinned.resolved() == recipe.resolved()
    with pytest.raises(RecipeError, match="not in the local Hub cache and offline"):
        load("hf://alice/prx-recipes/recipes/child.toml@v9")


def test_a_shared_recipe_cannot_extend_outside_itself(recipe_package: Path) -> None:
    child = recipe_package / "prx_recipes_demo" / "shared" / "escape.toml"
    child.write_text('extends = "../../elsewhere.toml"\nname = "x"\n')
    with pytest.raises(RecipeError, match="leaves the package or repository"):
        load("pkg:prx_recipes_demo/shared/escape.toml")
    child.write_text('extends = "/etc/recipe.toml"\nname = "x"\n')
    with pytest.raises(RecipeError, match="a shared recipe can only extend a shared one"):
        load("pkg:prx_recipes_demo/shared/escape.toml")


def test_package_http_and_hub_give_the_same_resolved_recipe_and_record_sources(
    recipe_package: Path,
    http_root: tuple[str, Path],
    hub_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base_url, folder = http_root
    write_shared(folder)
    monkeypatch.setenv("PRX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    load(f"{base_url}/child.toml")  # fill the URL cache, then everything below is offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = [
        "pkg:prx_recipes_demo/shared/child.toml",
        f"{base_url}/child.toml",
        "hf://alice/prx-recipes/recipes/child.toml",
    ]
    written = []
    for i, ref in enumerate(refs):
        recipe = load(ref)
        run_dir = tmp_path / f"run{i}"
        write_run_files(run_dir, recipe, ["prx-run", ref])
        info = json.loads((run_dir / "run.json").read_text())
        assert [(s["source"], s["sha256"]) for s in info["recipe_sources"]] == [
            (ref, sha(CHILD_TOML)),
            (ref.replace("child.toml", "base.toml"), sha(base_toml())),
        ]
        body = (run_dir / "recipe.toml").read_text()
        written.append(tomllib.loads(body))
        assert tomli.loads(body) == written[-1]  # the resolved recipe reads with both parsers
    assert written[0] == written[1] == written[2]
    assert written[0]["data"]["caption_weights"] == {"long": 0.8, "short": 0.2}


def test_changed_sources_name_the_file_and_both_hashes() -> None:
    recorded = [{"source": "a.toml", "sha256": "1" * 64}, {"source": "b.toml", "sha256": "2" * 64}]
    current = [{"source": "a.toml", "sha256": "1" * 64}, {"source": "b.toml", "sha256": "3" * 64}]
    assert changed_sources(recorded, current) == ["b.toml (sha256 222222222222… -> 333333333333…)"]
    assert changed_sources(recorded, [{"source": "c.toml", "sha256": "4" * 64}]) == [
        "c.toml (not a source of the recorded run)"
    ]


# --------------------------------------------------------------------------- TOML 1.1


def test_toml_1_1_recipe_loads_and_its_resolved_form_reads_with_tomllib(tmp_path: Path) -> None:
    child = write_shared(tmp_path)
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(CHILD_TOML)  # proves the recipe needs TOML 1.1
    recipe = load(child)
    assert recipe.slot_config("data").caption_weights == {"long": 0.8, "short": 0.2}
    text = dump_toml(recipe.shared())
    assert tomllib.loads(text) == tomli.loads(text)
    (tmp_path / "resolved.toml").write_text(text)
    assert load(tmp_path / "resolved.toml").resolved() == recipe.resolved()


# --------------------------------------------------------------------------- requires


def _with_requires(tmp_path: Path, body: str) -> Path:
    child = write_shared(tmp_path)
    child.write_text(CHILD_TOML + "\n[requires]\n" + body)
    return child


def test_requires_refuses_missing_and_mismatched_with_the_pip_line(tmp_path: Path) -> None:
    child = _with_requires(tmp_path, '"prx-minilm" = ">=0.1"\n"prx-warp" = ">=1.2"\n"prx-tread" = ">=9"\n')
    with pytest.raises(RecipeError) as err:
        load(child)
    message = str(err.value)
    assert message.startswith(f"{child}: ")
    assert "prx-warp>=1.2 is not installed" in message
    assert "prx-tread>=9 is required but prx-tread 0.1.0 is installed" in message
    assert message.endswith('install with: pip install "prx-warp>=1.2" "prx-tread>=9"')
    with pytest.raises(RecipeError, match=r"'requires.prx-minilm': Invalid specifier"):
        load(child, ["requires.prx-minilm=>>1"])
    satisfied = _with_requires(tmp_path / "ok", '"prx-minilm" = ">=0.1"\n"prx-tread" = ""\n')
    assert load(satisfied).requires == {"prx-minilm": ">=0.1", "prx-tread": ""}


def test_a_known_plugin_name_that_is_not_installed_gets_the_pip_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prx_core.plugins

    real = prx_core.plugins.installed_plugins
    monkeypatch.setattr(
        prx_core.plugins, "installed_plugins", lambda: {k: v for k, v in real().items() if k != "tread"}
    )
    child = write_shared(tmp_path)
    with pytest.raises(RecipeError) as err:
        load(child, ["router.use=tread"])
    assert str(err.value) == (
        "--set: 'router.use' names 'tread', which the plugin package prx-tread provides, and prx-tread is not "
        'installed; install with: pip install "prx-tread"'
    )


def test_resolved_recipe_in_the_run_directory_fills_requires_from_the_plugins_used(tmp_path: Path) -> None:
    from importlib import metadata

    recipe = load(write_shared(tmp_path / "src"), ["router.use=tread", "router.start=0", "router.end=1"])
    write_run_files(tmp_path / "run", recipe, ["prx-run"])
    written = tomllib.loads((tmp_path / "run" / "recipe.toml").read_text())
    assert written["requires"] == {
        "prx-minilm": f">={metadata.version('prx-minilm')}",
        "prx-tread": f">={metadata.version('prx-tread')}",
    }
    assert load(tmp_path / "run" / "recipe.toml").requires == written["requires"]  # and it re-checks


def test_plugin_index_matches_the_repository_plugin_packages() -> None:
    scanned = scan(ROOT / "plugins")
    assert scanned == KNOWN_PLUGIN_DISTRIBUTIONS, (
        "prx_core/plugin_index.py is stale; regenerate it: python -m prx_core.plugin_index plugins"
    )
    from prx_core.plugins import activate

    builtin_entries = {e.name for reg in activate({}, []).registries.values() for e in reg}
    assert not builtin_entries & set(scanned)  # a hint never shadows a builtin entry


# --------------------------------------------------------------------------- remove


def test_top_level_remove_drops_inherited_tables(tmp_path: Path) -> None:
    parent = TINY_RECIPE | {"metrics": {"shapes_adherence": {}}, "plugins": {"ema": {"decay": 0.99}}}
    (tmp_path / "base.toml").write_text(dump_toml(parent))
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\nname = "c"\nremove = ["metrics.shapes_adherence", "plugins.ema"]\n')
    recipe = load(child)
    assert recipe.metrics == {} and recipe.plugins == {}
    assert set(load(tmp_path / "base.toml").metrics) == {"shapes_adherence"}
    child.write_text('extends = "base.toml"\nname = "c"\nremove = ["plugins.ema"]\n[plugins.ema]\n')
    assert recipe.plugins == {} and load(child).plugins["ema"].decay != 0.99  # removed, then written afresh
    child.write_text('extends = "base.toml"\nname = "c"\nremove = ["plugins.repa"]\n')
    with pytest.raises(RecipeError, match=r"child.toml: cannot remove 'plugins.repa': the parent recipe has no"):
        load(child)
    (tmp_path / "alone.toml").write_text('remove = ["plugins.ema"]\nname = "a"\n')
    with pytest.raises(RecipeError, match="has no 'extends'"):
        load(tmp_path / "alone.toml")


def test_quickstart_child_on_an_image_folder_checks() -> None:
    recipe = load(ROOT / "recipes" / "quickstart_images.toml")
    assert recipe.slots["data"].use == "image_folder" and recipe.metrics == {}
    assert recipe.slot_config("data").size == 32  # inherited from the quickstart


# --------------------------------------------------------------------------- show and diff


def test_show_names_the_origin_of_every_key(tmp_path: Path) -> None:
    child = write_shared(tmp_path)
    recipe, raw = load_with_origins(child, ["train.steps=3"])
    rows = {key: origin for origin, key, _ in show_command.origins(recipe, raw)}
    base = show_command.label(str(tmp_path / "base.toml"))
    assert rows["name"] == show_command.label(str(child))
    assert rows["optimizer.lr"] == show_command.label(str(child))
    assert rows["data.caption_weights.short"] == show_command.label(str(child))
    assert rows["model.depth"] == base and rows["optimizer.use"] == base
    assert rows["train.steps"] == "--set"
    assert rows["optimizer.eps"] == "default" and rows["objective.use"] == "default"
    assert rows["requires.prx-minilm"] == "installed"
    assert set(rows) == set(show_command.flatten(recipe.shared()))


def test_show_command_prints_sources_and_aligned_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    child = write_shared(tmp_path)
    assert show_command.main([str(child), "--set", "train.steps=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# source {show_command.label(str(child))} sha256 {sha(CHILD_TOML)}"
    rows = [tuple(part.strip() for part in line.split("\t")) for line in lines[2:]]
    assert ("--set", "train.steps = 3") in rows
    assert len({line.index("\t") for line in lines[2:]}) == 1  # origins padded to one column
    assert any(line.endswith("\toptimizer.lr = 0.0003") for line in lines)


def test_diff_prints_one_dotted_key_per_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    child = write_shared(tmp_path / "a")
    other = tmp_path / "b" / "child.toml"
    write_shared(other.parent)
    other.write_text(CHILD_TOML.replace("lr = 3e-4", "lr = 1e-4") + "\n[plugins.ema]\ndecay = 0.99\n")
    assert diff_command.main([str(child), str(other)]) == 1
    lines = capsys.readouterr().out.splitlines()
    from importlib import metadata

    assert lines == sorted(lines)
    assert "optimizer.lr: 0.0003 -> 0.0001" in lines and "plugins.ema.decay: added 0.99" in lines
    assert f'requires.prx-ema: added ">={metadata.version("prx-ema")}"' in lines
    # Everything else that differs is EMA's other settings, at their defaults.
    assert all(line.startswith("plugins.ema.") for line in lines if not line.startswith(("optimizer.", "requires.")))
    write_run_files(tmp_path / "run", load(child), ["prx-run"])
    assert diff_command.main([str(child), str(tmp_path / "run")]) == 0  # a run directory is its recipe
    assert "no difference" in capsys.readouterr().err


# --------------------------------------------------------------------------- error attribution


def test_conflict_is_reported_against_the_file_that_made_the_choice() -> None:
    child = BAD / "child_switches_latent_space.toml"
    with pytest.raises(RecipeError) as err:
        load(child)
    quickstart = (ROOT / "recipes" / "quickstart.toml").resolve()
    assert str(err.value) == (
        f"{child.resolve()}: 'model.in_channels' is 3 (set in {quickstart}) but latent space 'flux_vae' "
        f"(set in {child.resolve()}) produces 16 channels"
    )


def test_no_user_facing_message_cites_a_document_section() -> None:
    """Errors, warnings and check messages name the bad input, not a section of the docs: "§" only
    appears in docstrings, comments and a plugin's ``INFO.spec``."""
    files = [*(ROOT / "prx_core").rglob("*.py"), *(ROOT / "plugins").glob("*/src/**/*.py")]
    cited = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        documentation: set[int] = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                documentation.add(id(body[0].value))  # a docstring
            if isinstance(node, ast.keyword) and node.arg == "spec":
                documentation.update(id(sub) for sub in ast.walk(node.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "§" in node.value:
                if id(node) not in documentation:
                    cited.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not cited, cited


# --------------------------------------------------------------------------- docs/recipes.md

DOC = ROOT / "docs" / "recipes.md"


def doc_blocks(kind: str) -> list[str]:
    import re

    return [
        body
        for lang, body in re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
        if lang == kind
    ]


def _cells(line: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in line.split("\t"))


def test_doc_show_excerpt_is_what_show_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert show_command.main(["recipes/quickstart_images.toml", "--set", "train.steps=10"]) == 0
    printed = {_cells(line) for line in capsys.readouterr().out.splitlines()}
    excerpt = next(b for b in doc_blocks("text") if "requires.prx-image-folder" in b)
    missing = [line for line in excerpt.splitlines() if _cells(line) not in printed]
    assert not missing, missing


def test_doc_diff_output_is_what_diff_prints(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert diff_command.main(["recipes/baseline.toml", "recipes/ablations/ema.toml"]) == 1
    printed = capsys.readouterr().out
    documented = next(b for b in doc_blocks("text") if "plugins.ema.decay" in b)
    assert documented == printed, f"docs/recipes.md's diff output is stale; it is now:\n{printed}"


def test_doc_examples_match_the_shipped_recipe_and_need_toml_1_1() -> None:
    blocks = doc_blocks("toml")
    assert (ROOT / "recipes" / "quickstart_images.toml").read_text(encoding="utf-8") in blocks
    multiline = next(b for b in blocks if "caption_weights = {" in b)
    with pytest.raises(tomllib.TOMLDecodeError):
        tomllib.loads(multiline)
    assert tomli.loads(multiline)["data"]["caption_weights"] == {"long": 0.8, "short": 0.2}
