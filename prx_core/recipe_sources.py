"""Where a recipe's text comes from: local files, installed packages, URLs and the Hugging Face Hub.

A recipe reference (the argument of ``prx-run``, ``prx-run check`` and ``extends``) is one of:

* a local path (``recipes/quickstart.toml``);
* ``pkg:<package>/<path>``: a file inside an installed (importable) package, read through
  :mod:`importlib.resources` (``pkg:prx_recipes_foo/ablations/x.toml``);
* ``ep:<name>/<path>``: the same, for the package a distribution names under the entry-point group
  ``prx.recipes`` (``[project.entry-points."prx.recipes"] foo = "prx_recipes_foo"`` makes
  ``ep:foo/ablations/x.toml``), so a plugin ships recipes without users knowing its module;
* ``https://…`` or ``http://…``: downloaded once into a content-addressed cache (below);
* ``hf://<owner>/<repo>/<path>[@<revision>]`` (``hf://datasets/…`` and ``hf://spaces/…`` for
  those repo types): a Hub file, through ``huggingface_hub.hf_hub_download``, which honours
  ``HF_HUB_OFFLINE`` and reads the local Hub cache.

A relative ``extends`` resolves against the file that states it, whatever its kind: inside the same
package, against the URL, or in the same Hub repo at the same revision. A shared (non-local) recipe
cannot extend a local file, since whoever receives it does not have that file.

The URL cache lives in ``$PRX_CACHE_DIR/recipes`` (default ``~/.cache/prx/recipes``): the content
as ``blobs/<sha256>`` and, per URL, ``urls/<sha256 of the URL>.json`` naming its blob. A cached URL
is never fetched again, so it also works offline (``PRX_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``); delete
its ``urls/`` entry to fetch it anew.

Every source read is recorded as ``{"source": <reference>, "sha256": <hex of its bytes>}`` (plus
``"commit"`` for a Hub file), the recipe named first, then its parents.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from prx_core.config import RecipeError

#: Entry-point group under which a distribution names the package holding its recipes.
RECIPES_ENTRY_POINT_GROUP = "prx.recipes"
#: A recipe larger than this is refused when downloaded (recipes are a few kB).
MAX_RECIPE_BYTES = 1 << 20
_SCHEMES = ("pkg:", "ep:", "http://", "https://", "hf://")
_HUB_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}


@dataclass(frozen=True)
class RecipeText:
    """One recipe file as read: its canonical reference, bytes and, for a local file, its path."""

    ref: str
    data: bytes
    path: Path | None = None
    commit: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def record(self) -> dict[str, str]:
        entry = {"source": self.ref, "sha256": self.sha256}
        if self.commit:
            entry["commit"] = self.commit
        return entry


def is_remote(ref: str) -> bool:
    """True for a ``pkg:``, ``ep:``, URL or ``hf://`` reference (anything but a local path)."""
    return ref.startswith(_SCHEMES)


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("PRX_OFFLINE", "HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    root = os.environ.get("PRX_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "prx") / "recipes"


def join(base: RecipeText, ref: str) -> str:
    """The canonical reference of ``ref`` as written in ``base`` (``extends``)."""
    if is_remote(ref):
        return ref
    if base.path is not None:
        return str((base.path.parent / ref).resolve())
    if Path(ref).is_absolute():
        raise RecipeError(
            f"{base.ref}: 'extends' names the local file {ref!r}; a shared recipe can only extend "
            "a shared one (a relative path, pkg:, ep:, a URL or hf://)"
        )
    if base.ref.startswith(("http://", "https://")):
        return urllib.parse.urljoin(base.ref, ref)
    if base.ref.startswith("hf://"):
        repo, path, revision = _split_hub(base.ref)
        joined = _join_inside(base.ref, posixpath.dirname(path), ref)
        return f"hf://{repo}/{joined}" + (f"@{revision}" if revision else "")
    scheme, _, rest = base.ref.partition(":")
    package, _, path = rest.partition("/")
    return f"{scheme}:{package}/{_join_inside(base.ref, posixpath.dirname(path), ref)}"


def _join_inside(where: str, folder: str, ref: str) -> str:
    joined = posixpath.normpath(posixpath.join(folder, ref))
    if joined.startswith("../") or joined == "..":
        raise RecipeError(f"{where}: 'extends = {ref!r}' leaves the package or repository it is in")
    return joined


def read(ref: str) -> RecipeText:
    """Read the recipe ``ref`` (a canonical reference, see :func:`join`)."""
    if ref.startswith(("pkg:", "ep:")):
        return _read_package(ref)
    if ref.startswith(("http://", "https://")):
        return _read_url(ref)
    if ref.startswith("hf://"):
        return _read_hub(ref)
    path = Path(ref).resolve()
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    return RecipeText(str(path), path.read_bytes(), path=path)


def _read_package(ref: str) -> RecipeText:
    scheme, _, rest = ref.partition(":")
    name, _, inner = rest.partition("/")
    if not name or not inner:
        raise RecipeError(f"{ref}: expected {scheme}:<{'package' if scheme == 'pkg' else 'name'}>/<path>.toml")
    package = name
    if scheme == "ep":
        points = {ep.name: ep.value for ep in metadata.entry_points(group=RECIPES_ENTRY_POINT_GROUP)}
        if name not in points:
            from prx_core.config import suggest

            raise RecipeError(
                f"{ref}: no installed distribution names '{name}' under the entry-point group "
                f"'{RECIPES_ENTRY_POINT_GROUP}'{suggest(name, points)} (known: {', '.join(sorted(points)) or 'none'})"
            )
        package = points[name]
    try:
        node = resources.files(package).joinpath(*inner.split("/"))
        data = node.read_bytes()
    except ModuleNotFoundError:
        raise RecipeError(f"{ref}: package '{package}' is not installed (not importable)") from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise RecipeError(f"{ref}: package '{package}' has no file '{inner}'") from None
    return RecipeText(ref, data)


def _read_url(url: str) -> RecipeText:
    root = cache_dir()
    index = root / "urls" / f"{hashlib.sha256(url.encode()).hexdigest()}.json"
    if index.is_file():
        try:
            digest = str(json.loads(index.read_text(encoding="utf-8"))["sha256"])
        except (ValueError, KeyError):
            digest = ""  # a damaged entry: fetch again
        blob = root / "blobs" / digest
        if digest and blob.is_file():
            data = blob.read_bytes()
            if hashlib.sha256(data).hexdigest() == digest:
                return RecipeText(url, data)
    if offline():
        raise RecipeError(f"{url}: not in the recipe cache ({root}) and offline (PRX_OFFLINE / HF_HUB_OFFLINE)")
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # http(s) only: read() routes nothing else here
            data = response.read(MAX_RECIPE_BYTES + 1)
    except (urllib.error.URLError, OSError) as err:
        raise RecipeError(f"{url}: download failed: {err}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{url}: larger than {MAX_RECIPE_BYTES} bytes; not a recipe")
    digest = hashlib.sha256(data).hexdigest()
    _write_atomic(root / "blobs" / digest, data)
    _write_atomic(index, json.dumps({"url": url, "sha256": digest}).encode())
    return RecipeText(url, data)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _split_hub(ref: str) -> tuple[str, str, str | None]:
    """``hf://[datasets/]owner/repo/path@rev`` -> (``[datasets/]owner/repo``, ``path``, ``rev``)."""
    body = ref.removeprefix("hf://")
    body, at, revision = body.rpartition("@") if "@" in body else (body, "", "")
    parts = body.split("/")
    width = 3 if parts[0] in _HUB_REPO_TYPES else 2
    if len(parts) <= width or not all(parts):
        raise RecipeError(f"{ref}: expected hf://owner/repo/path.toml[@revision]")
    return "/".join(parts[:width]), "/".join(parts[width:]), (revision or None) if at else None


def _read_hub(ref: str) -> RecipeText:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, filename, revision = _split_hub(ref)
    repo_type = None
    if repo.split("/")[0] in _HUB_REPO_TYPES:
        kind, _, repo = repo.partition("/")
        repo_type = _HUB_REPO_TYPES[kind]
    try:
        local = hf_hub_download(repo, filename, revision=revision, repo_type=repo_type, local_files_only=offline())
    except LocalEntryNotFoundError:
        why = "offline (HF_HUB_OFFLINE)" if offline() else "the Hub could not be reached"
        raise RecipeError(f"{ref}: not in the local Hub cache and {why}") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise RecipeError(f"{ref}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    path = Path(local)
    # The cache stores files under snapshots/<commit>/<filename>: record which commit was read.
    parents = path.parents[len(Path(filename).parts) - 1]
    commit = parents.name if parents.parent.name == "snapshots" else None
    return RecipeText(ref, path.read_bytes(), commit=commit)


def changed_sources(recorded: list[dict[str, Any]], current: list[dict[str, str]]) -> list[str]:
    """One line per source whose content differs from the one recorded (or that was not used then)."""
    before = {entry.get("source"): entry.get("sha256") for entry in recorded}
    lines = []
    for entry in current:
        old = before.get(entry["source"])
        if old is None:
            lines.append(f"{entry['source']} (not a source of the recorded run)")
        elif old != entry["sha256"]:
            lines.append(f"{entry['source']} (sha256 {old[:12]}… -> {entry['sha256'][:12]}…)")
    return lines
