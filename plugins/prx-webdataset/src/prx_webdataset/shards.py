"""Turning the ``shards`` list into local files: brace ranges, globs, and one-time downloads."""

from __future__ import annotations

import glob
import os
import posixpath
import re
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prx_core.data.indexed import cache_key

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = frozenset("*?[")
_CHUNK = 1 << 20


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..012}`` numeric ranges (zero padding kept).

    The WebDataset convention for naming many shards, e.g. ``shard-{00000..00099}.tar``. Groups
    expand left to right; text without braces is returned as is.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo_text, hi_text = numeric.groups()
        lo, hi = int(lo_text), int(hi_text)
        width = len(lo_text) if lo_text.startswith("0") and len(lo_text) > 1 else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not an expansion ("{key}"): keep the braces literally and expand what follows
        head, tail = pattern[: match.end()], pattern[match.end() :]
        return [head + rest for rest in expand_braces(tail)]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for option in options for out in expand_braces(head + option + tail)]


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def download(url: str, directory: Path, progress: bool) -> Path:
    """Download ``url`` into ``directory`` once; later calls return the cached file.

    The file is written under a per-process temporary name and renamed into place when
    complete, so concurrent ranks and interrupted downloads never leave a partial shard that
    looks finished.
    """
    name = posixpath.basename(urllib.parse.urlparse(url).path) or "shard.tar"
    dest = directory / f"{cache_key(url)}-{name}"
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - http(s) only, checked by is_url
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            written = 0
            with (
                tmp.open("wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=None if progress else True) as bar,
            ):
                while block := response.read(_CHUNK):
                    out.write(block)
                    written += len(block)
                    bar.update(len(block))
        if total is not None and written != total:
            raise OSError(f"download of {url} stopped at {written} of {total} bytes")
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def resolve_shards(specs: Sequence[str], download_dir: Path, progress: bool) -> list[tuple[str, Path]]:
    """``(display name, local path)`` of every shard, in order, duplicates dropped.

    Brace ranges expand first; then URLs are downloaded, globs are matched (sorted; a glob that
    matches nothing is an error) and plain paths must exist.
    """
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for spec in specs:
        for item in expand_braces(spec):
            if is_url(item):
                pairs = [(item, download(item, download_dir, progress))]
            elif _GLOB_CHARS & set(item):
                matches = sorted(glob.glob(os.path.expanduser(item)))
                if not matches:
                    raise ValueError(f"webdataset: shard pattern {item!r} matches no file")
                pairs = [(m, Path(m)) for m in matches]
            else:
                path = Path(item).expanduser()
                if not path.is_file():
                    raise ValueError(f"webdataset: shard {item!r} does not exist")
                pairs = [(item, path)]
            for display, path in pairs:
                key = str(path.resolve())
                if key not in seen:
                    seen.add(key)
                    out.append((display, path))
    if not out:
        raise ValueError("webdataset: data.shards names no shard")
    return out
