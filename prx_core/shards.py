"""The on-disk format of ``prx-run precompute``: safetensors shards, progress logs and ``index.json``.

Layout of an output directory::

    index.json                      # written last, by rank 0: shards, caption keys, what produced them
    samples.safetensors             # the sample table: id, shard, row, caption keys present (rank 0)
    precompute.json                 # the settings of the run that writes here (resume must match)
    shards/<rank>-<bucket>-<k>.safetensors
    progress/rank<r>.jsonl          # one line per committed shard of that rank
    held_out.safetensors            # held-out latents, caption states and uint8 images
    empty.safetensors               # the empty-prompt encoding
    train.toml                      # the resolved recipe with [data] use = "precomputed"

A shard holds rows of one bucket, stacked: ``latents`` [N, C, h, w], optional ``latent_std``,
``text.<key>`` [N, L, D] and ``mask.<key>`` [N, L] for every caption key, ``features.<name>`` and
``ids`` [N] (the source's sample indices). Strings travel in the shard too, packed
(:func:`pack_strings`): ``captions.<key>.utf8`` / ``captions.<key>.offsets`` for every caption
key (empty where an item lacks it) and ``names.utf8`` / ``names.offsets``. Rows are read lazily
through ``safe_open(...).get_slice``, so a training rank maps only the rows of its batch, never a
whole shard, and no process ever holds every caption in memory: at the published 1M (8.7M for the
speedrun) long-captioned images, a JSON list of them was gigabytes per rank (format version 1).

The sample table (``samples.safetensors``) is four int64 columns sorted by id, ``ids``,
``shard`` (into ``index.json``'s shard list), ``row`` and ``caption_keys`` (a bit mask over
``index.json``'s ``caption_keys``): 32 bytes per sample, read into numpy arrays.

Every file appears under its final name through one ``os.replace`` after its bytes are fsynced;
a shard is then recorded in its rank's progress log (flushed and fsynced too). A killed run
therefore leaves only complete shards, and a rerun skips every shard its log records.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

INDEX_FILE = "index.json"
SETTINGS_FILE = "precompute.json"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
HELD_OUT_FILE = "held_out.safetensors"
EMPTY_FILE = "empty.safetensors"
SAMPLES_FILE = "samples.safetensors"
FORMAT = "prx-shards"
#: 2: strings live in the shards and the sample table in samples.safetensors (1: both in index.json).
FORMAT_VERSION = 2
#: The sample table's columns (int64, one row per sample, sorted by id).
SAMPLE_COLUMNS = ("ids", "shard", "row", "caption_keys")


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


def pack_strings(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``texts`` as one uint8 tensor of their UTF-8 bytes and int64 offsets [N + 1]: text i is
    bytes ``offsets[i]:offsets[i + 1]``. Safetensors stores tensors only; this keeps strings
    row-addressable like every other column of a shard."""
    encoded = [text.encode("utf-8") for text in texts]
    offsets = [0]
    for blob in encoded:
        offsets.append(offsets[-1] + len(blob))
    joined = b"".join(encoded)
    utf8 = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.zeros(0, dtype=torch.uint8)
    return utf8, torch.tensor(offsets, dtype=torch.int64)


def key_mask(present: Iterable[str], keys: Sequence[str]) -> int:
    """Bit ``i`` set when ``keys[i]`` is in ``present`` (caption keys an item has)."""
    have = set(present)
    return sum(1 << i for i, key in enumerate(keys) if key in have)


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

    def strings(self, shard: str, column: str, rows: Sequence[int]) -> list[str]:
        """Rows ``rows`` of a packed string column (``captions.<key>``, ``names``): two small
        slices per row, so a batch reads its own captions and nothing else."""
        handle = self._handle(shard)
        if f"{column}.offsets" not in handle.keys():
            raise ShardError(f"shard {self.root / shard} has no string column '{column}'")
        offsets, utf8 = handle.get_slice(f"{column}.offsets"), handle.get_slice(f"{column}.utf8")
        out = []
        for row in rows:
            start, stop = (int(v) for v in offsets[row : row + 2])
            out.append(bytes(utf8[start:stop].numpy()).decode("utf-8") if stop > start else "")
        return out

    def row_views(self, shard: str, key: str, rows: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(row, tensor)`` for each distinct requested row of tensor ``key`` in ``shard``.

        Neighbouring rows are read as one slice (the only copy out of the memory map); each
        tensor is a view into it, for the caller to place where it wants them.
        """
        handle = self._handle(shard)
        if key not in handle.keys():
            raise ShardError(f"shard {self.root / shard} has no tensor '{key}' (it has {sorted(handle.keys())})")
        sliced = handle.get_slice(key)
        for start, stop in _runs(rows):
            block = sliced[start:stop]
            for offset in range(stop - start):
                yield start + offset, block[offset]

    def rows(self, shard: str, key: str, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (in that order, repeats allowed) of tensor ``key`` in ``shard``, stacked."""
        pieces = dict(self.row_views(shard, key, rows))
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


def assemble_index(
    header: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``index.json`` and the sample table from the run's header and every rank's shard records.

    Samples are sorted by source id, so neither depends on how many ranks wrote them beyond
    which shard and row hold each sample. A record lists its shard's ``ids`` and, per row, the
    bit mask of the caption keys that item has (``key_masks``, over ``header["caption_keys"]``).
    """
    shards: list[dict[str, Any]] = []
    # One small tensor per shard and column, concatenated once: millions of samples never become
    # millions of Python ints held at the same time.
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in SAMPLE_COLUMNS}
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
        rows = len(record["ids"])
        if len(record["key_masks"]) != rows:
            raise ShardError(
                f"the progress record of {record['shard']} lists {rows} ids but {len(record['key_masks'])} masks"
            )
        columns["ids"].append(torch.tensor(record["ids"], dtype=torch.int64))
        columns["shard"].append(torch.full((rows,), number, dtype=torch.int64))
        columns["row"].append(torch.arange(rows, dtype=torch.int64))
        columns["caption_keys"].append(torch.tensor(record["key_masks"], dtype=torch.int64))
    table = {name: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64) for name, parts in columns.items()}
    order = torch.argsort(table["ids"], stable=True)
    table = {name: column[order] for name, column in table.items()}
    if table["ids"].numel() and bool((table["ids"][1:] == table["ids"][:-1]).any()):
        raise ShardError("two shards hold the same sample id; the progress logs come from different runs")
    index = {
        **header,
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "shards": shards,
        "samples": {"file": SAMPLES_FILE, "count": int(table["ids"].numel())},
        "skipped_ids": sorted(skipped),
        "skipped_at_encode": len(skipped),
    }
    return index, table


def read_samples(root: Path, index: Mapping[str, Any]) -> dict[str, Any]:
    """The sample table as numpy int64 arrays (``SAMPLE_COLUMNS``), checked against ``index``."""
    import numpy as np

    path = root / SAMPLES_FILE
    tensors = read_tensors(path)
    missing = [name for name in SAMPLE_COLUMNS if name not in tensors]
    if missing:
        raise ShardError(f"{path} lacks the column(s) {', '.join(missing)}; rerun prx-run precompute")
    table = {name: np.ascontiguousarray(tensors[name].numpy(), dtype=np.int64) for name in SAMPLE_COLUMNS}
    count = int(index["samples"]["count"])
    if any(len(column) != count for column in table.values()):
        raise ShardError(f"{path} holds {len(table['ids'])} samples, {root / INDEX_FILE} says {count}")
    if count and int(table["shard"].max()) >= len(index["shards"]):
        raise ShardError(f"{path} names shards that {root / INDEX_FILE} does not list")
    return table
