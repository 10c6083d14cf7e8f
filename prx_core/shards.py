"""The on-disk format of ``prx-run precompute``: safetensors shards, progress logs and ``index.json``.

Layout of an output directory::

    index.json                      # written last, by rank 0: shards, samples, what produced them
    precompute.json                 # the settings of the run that writes here (resume must match)
    shards/<rank>-<bucket>-<k>.safetensors
    progress/rank<r>.jsonl          # one line per committed shard of that rank
    held_out.safetensors            # held-out latents, caption states and uint8 images
    empty.safetensors               # the empty-prompt encoding
    train.toml                      # the resolved recipe with [data] use = "precomputed"

A shard holds rows of one bucket, stacked: ``latents`` [N, C, h, w], optional ``latent_std``,
``text.<key>`` [N, L, D] and ``mask.<key>`` [N, L] for every caption key, ``features.<name>`` and
``ids`` [N] (the source's sample indices). Rows are read lazily through ``safe_open(...).get_slice``,
so a training rank maps only the rows of its batch, never a whole shard.

Every file appears under its final name through one ``os.replace`` after its bytes are fsynced;
a shard is then recorded in its rank's progress log (flushed and fsynced too). A killed run
therefore leaves only complete shards, and a rerun skips every shard its log records.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "index.json"
SETTINGS_FILE = "precompute.json"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
HELD_OUT_FILE = "held_out.safetensors"
EMPTY_FILE = "empty.safetensors"
FORMAT = "prx-shards"
FORMAT_VERSION = 1


class ShardError(RuntimeError):
    """A shard directory is missing, incomplete or does not match what reads it."""


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors_atomic(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save ``tensors`` as safetensors at ``path``: temp file, fsync, rename, fsync the directory."""
    from safetensors.torch import save_file

    if not tensors:
        raise ValueError(f"refusing to write an empty shard {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # safetensors wants contiguous CPU tensors that share no storage.
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, str(tmp), metadata=dict(metadata) if metadata else None)
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json(path: Path) -> Any:
    def reject(literal: str) -> Any:
        raise ValueError(f"{path}: non-standard JSON literal {literal}")

    with path.open(encoding="utf-8") as handle:
        return json.load(handle, parse_constant=reject)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A small safetensors file (held-out set, empty prompt), loaded whole on the CPU."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ShardError(f"{path} is missing; rerun prx-run precompute on this directory to complete it")
    return load_file(str(path))


class ProgressLog:
    """Append-only JSON lines, one per committed shard of one rank.

    A line is appended only after its shard is durable, and is itself flushed and fsynced, so
    every recorded shard exists. A torn last line (a kill while writing it) is ignored: its
    shard is simply redone, atomically replacing the file of the same name.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn tail of a killed run
            if isinstance(record, dict):
                out.append(record)
        return out

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(dict(record), sort_keys=True, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _runs(rows: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Sorted unique rows as maximal [start, stop) runs, so neighbouring rows are one slice."""
    ordered = sorted(set(rows))
    if not ordered:
        return
    start = prev = ordered[0]
    for row in ordered[1:]:
        if row != prev + 1:
            yield start, prev + 1
            start = row
        prev = row
    yield start, prev + 1


class ShardReader:
    """Lazy row access to the shards of one directory.

    Keeps up to ``max_open`` files open (memory-mapped by safetensors); reads only the requested
    rows of the requested keys with ``get_slice``.
    """

    def __init__(self, root: Path, max_open: int = 32) -> None:
        if max_open < 1:
            raise ValueError("max_open must be >= 1")
        self.root = root
        self.max_open = max_open
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _handle(self, shard: str) -> Any:
        from safetensors import safe_open

        handle = self._open.get(shard)
        if handle is not None:
            self._open.move_to_end(shard)
            return handle
        path = self.root / shard
        if not path.is_file():
            raise ShardError(f"shard {path} listed in {self.root / INDEX_FILE} is missing")
        handle = safe_open(str(path), framework="pt", device="cpu")
        self._open[shard] = handle
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def keys(self, shard: str) -> list[str]:
        return sorted(self._handle(shard).keys())

    def rows(self, shard: str, key: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (in that order, repeats allowed) of tensor ``key`` in ``shard``."""
        handle = self._handle(shard)
        if key not in handle.keys():
            raise ShardError(f"shard {self.root / shard} has no tensor '{key}' (it has {sorted(handle.keys())})")
        sliced = handle.get_slice(key)
        pieces: dict[int, torch.Tensor] = {}
        for start, stop in _runs(rows):
            block = sliced[start:stop]
            for offset in range(stop - start):
                pieces[start + offset] = block[offset]
        return torch.stack([pieces[r] for r in rows])

    def close(self) -> None:
        self._open.clear()


def check_index(index: Mapping[str, Any], where: Path) -> None:
    if index.get("format") != FORMAT:
        raise ShardError(f"{where} is not a prx-run precompute index (format {index.get('format')!r})")
    if index.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{where} has format version {index.get('version')}, this prx reads version {FORMAT_VERSION}; "
            "rerun prx-run precompute"
        )


def read_index(root: Path) -> dict[str, Any]:
    path = root / INDEX_FILE
    if not path.is_file():
        partial = (root / PROGRESS_DIR).is_dir()
        hint = "it is incomplete: rerun the same prx-run precompute command" if partial else "run prx-run precompute"
        raise ShardError(f"{root} has no {INDEX_FILE}; {hint}")
    index = read_json(path)
    if not isinstance(index, dict):
        raise ShardError(f"{path} does not hold a JSON object")
    check_index(index, path)
    return index


def assemble_index(header: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``index.json`` from the run's header and every rank's shard records.

    Samples are listed by source id, so the index does not depend on how many ranks wrote it
    beyond which shard and row hold each sample. Each sample row is
    ``[id, name, bucket_h, bucket_w, shard_number, row, captions]``.
    """
    shards: list[dict[str, Any]] = []
    samples: list[list[Any]] = []
    skipped: list[int] = []
    for record in sorted(records, key=lambda r: str(r["shard"])):
        skipped.extend(int(i) for i in record.get("skipped", []))
        if not record.get("ids"):
            continue  # every item of this chunk failed to decode: no file was written
        number = len(shards)
        height, width = (int(v) for v in record["bucket"])
        shards.append(
            {
                "file": str(record["shard"]),
                "bucket": [height, width],
                "rows": len(record["ids"]),
                "features": sorted(record.get("features", {})),
            }
        )
        for row, (sample_id, name, captions) in enumerate(
            zip(record["ids"], record["names"], record["captions"], strict=True)
        ):
            samples.append([int(sample_id), str(name), height, width, number, row, dict(captions)])
    samples.sort(key=lambda s: s[0])
    ids = [s[0] for s in samples]
    if len(set(ids)) != len(ids):
        raise ShardError("two shards hold the same sample id; the progress logs come from different runs")
    return {
        **header,
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "shards": shards,
        "samples": samples,
        "skipped_ids": sorted(skipped),
        "skipped_at_encode": len(skipped),
    }
