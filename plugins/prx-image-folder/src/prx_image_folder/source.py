"""Indexing an image folder: list the images, read the caption sidecar, probe headers (cached)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prx_core.data.decode import ImageLimits, ImageSource, probe
from prx_core.data.indexed import (
    IndexedItem,
    IndexedSource,
    IndexReport,
    cache_key,
    cache_root,
    probe_all,
    read_cache,
    resolve_threads,
    show_progress,
    write_cache,
)

if TYPE_CHECKING:
    from prx_image_folder import ImageFolderConfig

logger = logging.getLogger("prx.data")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
#: Bumped when the cache layout changes, so old caches are ignored rather than misread.
_CACHE_VERSION = 1


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int


@dataclass
class Sidecar:
    """The parsed caption file: captions per relative path, the caption keys, rejected rows."""

    rows: dict[str, dict[str, str | None]] = field(default_factory=dict)
    caption_keys: tuple[str, ...] = ()
    #: (where, reason) of rows that could not be used.
    rejected: list[tuple[str, str]] = field(default_factory=list)


def list_images(root: Path) -> dict[str, FileStat]:
    """Every image file under ``root`` (relative POSIX path -> size and mtime), hidden ones skipped.

    Names starting with "." are skipped, files and folders alike: macOS leaves ``._name.jpg``
    resource forks next to real images, and they are not images.
    """
    found: dict[str, FileStat] = {}
    stack = [root]
    visited = {os.path.realpath(root)}  # symlinked folders are followed, but a link loop only once
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real not in visited:
                        visited.add(real)
                        stack.append(Path(entry.path))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    stat = entry.stat()
                    rel = Path(entry.path).relative_to(root).as_posix()
                    found[rel] = FileStat(stat.st_size, stat.st_mtime_ns)
    return dict(sorted(found.items()))


def _normalise(name: object) -> str | None:
    """A sidecar ``file`` value as a relative POSIX path inside the root, or None if it is not one."""
    if not isinstance(name, str) or not name.strip():
        return None
    rel = posixpath.normpath(name.strip().replace("\\", "/"))
    if rel.startswith("/") or rel == ".." or rel.startswith("../"):
        return None
    return rel


def read_sidecar(path: Path) -> Sidecar:
    """Parse a ``.jsonl`` or ``.csv`` caption sidecar.

    JSONL: one object per line with a ``file`` key; a key is a caption key when its values are
    strings (or null) in every row; keys holding numbers or lists (``width``, ``tags``) are not.
    CSV: a header row with a ``file`` column; every other column is a caption key and an empty
    cell is a missing caption. Malformed rows and repeated files are rejected and reported.
    """
    sidecar = Sidecar()
    text_keys: set[str] = set()
    other_keys: set[str] = set()
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    sidecar.rejected.append((f"{path.name}:{number}", "bad_sidecar_row"))
                    continue
                rel = _normalise(row.get("file")) if isinstance(row, dict) else None
                if rel is None:
                    sidecar.rejected.append((f"{path.name}:{number}", "bad_sidecar_row"))
                    continue
                if rel in sidecar.rows:
                    sidecar.rejected.append((f"{path.name}:{number} ({rel})", "duplicate_row"))
                    continue
                captions: dict[str, str | None] = {}
                for key, value in row.items():
                    if key == "file":
                        continue
                    if isinstance(value, str) or value is None:
                        if isinstance(value, str):
                            text_keys.add(key)
                        captions[key] = value
                    else:
                        other_keys.add(key)
                sidecar.rows[rel] = captions
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            if "file" not in columns:
                raise ValueError(f"image_folder: caption sidecar {path} has no 'file' column (columns: {columns})")
            text_keys = {c for c in columns if c != "file"}
            for number, csv_row in enumerate(reader, 2):
                rel = _normalise(csv_row.get("file"))
                if rel is None or None in csv_row:  # None key: more cells than header columns
                    sidecar.rejected.append((f"{path.name}:{number}", "bad_sidecar_row"))
                    continue
                if rel in sidecar.rows:
                    sidecar.rejected.append((f"{path.name}:{number} ({rel})", "duplicate_row"))
                    continue
                sidecar.rows[rel] = {k: (v or None) for k, v in csv_row.items() if k != "file"}
    else:
        raise ValueError(f"image_folder: caption sidecar must be .jsonl or .csv, got {path}")
    keys = sorted(text_keys - other_keys)
    sidecar.caption_keys = tuple(keys)
    # Drop non-caption keys from the rows so they can never be drawn or fallen back to.
    for rel, captions in sidecar.rows.items():
        sidecar.rows[rel] = {k: v for k, v in captions.items() if k in sidecar.caption_keys}
    return sidecar


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=12)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached_result(entry: object, stat: FileStat) -> tuple[int, int] | str | None:
    """A cache entry ``[size, mtime_ns, [h, w] | reason]`` if it matches the file as it is now."""
    if not (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [stat.size, stat.mtime_ns]):
        return None
    value = entry[2]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


class ImageFolderSource(IndexedSource):
    """Images under ``root`` with captions from a sidecar file (see the package docstring)."""

    kind = "image_folder"

    def __init__(self, config: ImageFolderConfig, seed: int, rank: int = 0) -> None:
        self.root = Path(config.root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"image_folder: data.root {str(self.root)!r} is not a directory")
        sidecar_path = self.root / config.captions
        if not sidecar_path.is_file():
            raise ValueError(f"image_folder: caption sidecar {str(sidecar_path)!r} does not exist (data.captions)")
        sidecar = read_sidecar(sidecar_path)
        if not sidecar.caption_keys:
            raise ValueError(f"image_folder: caption sidecar {sidecar_path} has no caption columns besides 'file'")
        files = list_images(self.root)
        sizes = self._probe(files, sidecar.rows, config, rank)

        items: list[IndexedItem] = []
        skipped: list[tuple[str, str]] = list(sidecar.rejected)
        self._paths: list[str] = []
        self._captions: list[dict[str, str | None]] = []
        for rel in sorted(set(files) | set(sidecar.rows)):
            if rel not in files:
                skipped.append((rel, "missing_file"))
            elif rel not in sidecar.rows:
                skipped.append((rel, "no_caption"))
            else:
                result = sizes[rel]
                if isinstance(result, str):
                    skipped.append((rel, result))
                    continue
                height, width = result
                items.append(IndexedItem(rel, height, width))
                self._paths.append(rel)
                self._captions.append(sidecar.rows[rel])
        content = [f"{rel}\t{stat.size}" for rel, stat in files.items()]
        content.append(f"sidecar\t{config.captions}\t{_file_digest(sidecar_path)}")
        report = IndexReport(items=items, skipped=skipped, caption_keys=sidecar.caption_keys, content=content)
        super().__init__(config, seed, report)

    def _probe(
        self,
        files: Mapping[str, FileStat],
        rows: Mapping[str, object],
        config: ImageFolderConfig,
        rank: int,
    ) -> dict[str, tuple[int, int] | str]:
        """Header size (or skip reason) of every captioned file, reusing the cache where the file's
        size and mtime are unchanged."""
        cache_dir = cache_root(config.index_cache)
        cache_path = None
        if cache_dir is not None:
            cache_path = cache_dir / "index" / f"image_folder-{cache_key(self.root.resolve())}.json"
        cached = read_cache(cache_path) or {}
        limits_tag = f"{config.min_side}:{config.max_pixels}"
        entries: Mapping[str, list[object]] = {}
        if cached.get("version") == _CACHE_VERSION and cached.get("limits") == limits_tag:
            entries = cached.get("files", {})
        results: dict[str, tuple[int, int] | str] = {}
        todo: list[str] = []
        for rel in files:
            if rel not in rows:
                continue
            stat = files[rel]
            entry = entries.get(rel)
            value = _cached_result(entry, stat)
            if value is None:
                todo.append(rel)
            else:
                results[rel] = value
        limits = ImageLimits(min_side=config.min_side, max_pixels=config.max_pixels)
        jobs = [lambda rel=rel: probe(self.root / rel, limits) for rel in todo]
        found = probe_all(
            jobs, resolve_threads(config.decode_threads), "indexing images", show_progress(rank, len(jobs))
        )
        results.update(zip(todo, found, strict=True))
        if todo or set(entries) - set(results):
            logger.info(
                "image_folder: read %d image headers (%d from the index cache)", len(todo), len(results) - len(todo)
            )
            write_cache(
                cache_path,
                {
                    "version": _CACHE_VERSION,
                    "root": str(self.root.resolve()),
                    "limits": limits_tag,
                    "files": {
                        rel: [files[rel].size, files[rel].mtime_ns, list(r) if isinstance(r, tuple) else r]
                        for rel, r in sorted(results.items())
                    },
                },
            )
        return results

    def _image_source(self, index: int) -> ImageSource:
        return self.root / self._paths[index]

    def _raw_captions(self, index: int) -> Mapping[str, object]:
        return self._captions[index]
