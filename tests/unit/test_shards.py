"""The shard format of ``prx-run precompute``: atomic writes, lazy row reads, progress logs, the index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prx_core.commands.precompute import shard_plan
from prx_core.shards import (
    FORMAT,
    FORMAT_VERSION,
    ProgressLog,
    ShardError,
    ShardReader,
    assemble_index,
    read_index,
    write_json_atomic,
    write_tensors_atomic,
)


def _tensors(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(rows, 3, 4, 4, generator=g).to(torch.bfloat16),
        "text.long": torch.randn(rows, 5, 6, generator=g),
        "mask.long": torch.rand(rows, 5, generator=g) > 0.5,
        "ids": torch.arange(100, 100 + rows, dtype=torch.int64),
    }


def test_round_trip_reads_rows_in_the_order_asked(tmp_path: Path) -> None:
    tensors = _tensors(7)
    write_tensors_atomic(tmp_path / "shards" / "a.safetensors", tensors, {"bucket": "16x16"})
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["a.safetensors"]  # no temp file left
    reader = ShardReader(tmp_path / "shards", max_open=1)
    assert reader.keys("a.safetensors") == sorted(tensors)
    rows = [5, 0, 1, 2, 5, 6]  # out of order, a repeat, a contiguous run
    for key, full in tensors.items():
        got = reader.rows("a.safetensors", key, rows)
        assert got.dtype == full.dtype
        assert torch.equal(got, full[rows]), key
    with pytest.raises(ShardError, match="no tensor 'text.short'"):
        reader.rows("a.safetensors", "text.short", [0])
    with pytest.raises(ShardError, match="missing"):
        reader.rows("b.safetensors", "ids", [0])


def test_reader_keeps_a_bounded_number_of_files_open(tmp_path: Path) -> None:
    for name in "abc":
        write_tensors_atomic(tmp_path / f"{name}.safetensors", _tensors(2, seed=ord(name)))
    reader = ShardReader(tmp_path, max_open=2)
    for name in "abca":
        reader.rows(f"{name}.safetensors", "ids", [1])
    assert list(reader._open) == ["c.safetensors", "a.safetensors"]


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    path = tmp_path / "a.safetensors"
    write_tensors_atomic(path, _tensors(2))
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_tensors_atomic(path, _tensors(3, seed=1))
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="empty shard"):
        write_tensors_atomic(tmp_path / "empty.safetensors", {})


def test_progress_log_ignores_a_torn_last_line(tmp_path: Path) -> None:
    log = ProgressLog(tmp_path / "progress" / "rank000.jsonl")
    assert log.records() == []
    log.append({"shard": "a", "ids": [1, 2]})
    log.append({"shard": "b", "ids": []})
    with log.path.open("a", encoding="utf-8") as handle:
        handle.write('{"shard": "c", "ids": [3')  # killed while writing
    assert [r["shard"] for r in log.records()] == ["a", "b"]


def _record(shard: str, bucket: tuple[int, int], ids: list[int], skipped: list[int] | None = None) -> dict:
    return {
        "shard": shard,
        "bucket": list(bucket),
        "ids": ids,
        "names": [f"img{i}" for i in ids],
        "captions": [{"long": f"long {i}"} for i in ids],
        "skipped": skipped or [],
        "features": {"repa:x:2x2": [4, 8]} if ids else {},
    }


def test_index_lists_samples_by_id_with_their_shard_and_row() -> None:
    records = [
        _record("r001-16x16-00000.safetensors", (16, 16), [7, 3]),
        _record("r000-16x16-00000.safetensors", (16, 16), [4, 0], skipped=[2]),
        _record("r000-16x32-00000.safetensors", (16, 32), [], skipped=[6]),  # every item failed: no file
    ]
    index = assemble_index({"mode": "sample"}, records)
    assert (index["format"], index["version"], index["mode"]) == (FORMAT, FORMAT_VERSION, "sample")
    assert [s["file"] for s in index["shards"]] == ["r000-16x16-00000.safetensors", "r001-16x16-00000.safetensors"]
    assert index["shards"][0] == {
        "file": "r000-16x16-00000.safetensors",
        "bucket": [16, 16],
        "rows": 2,
        "features": ["repa:x:2x2"],
    }
    # [id, name, bucket h, bucket w, shard number, row, captions], sorted by id.
    assert index["samples"] == [
        [0, "img0", 16, 16, 0, 1, {"long": "long 0"}],
        [3, "img3", 16, 16, 1, 1, {"long": "long 3"}],
        [4, "img4", 16, 16, 0, 0, {"long": "long 4"}],
        [7, "img7", 16, 16, 1, 0, {"long": "long 7"}],
    ]
    assert index["skipped_ids"] == [2, 6] and index["skipped_at_encode"] == 2
    with pytest.raises(ShardError, match="same sample id"):
        assemble_index({}, [*records, _record("r002-16x16-00000.safetensors", (16, 16), [3])])


def test_index_round_trips_and_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="run prx-run precompute"):
        read_index(tmp_path)
    (tmp_path / "progress").mkdir()
    with pytest.raises(ShardError, match="incomplete: rerun the same prx-run precompute command"):
        read_index(tmp_path)
    index = assemble_index({"mode": "mode"}, [_record("a.safetensors", (8, 8), [1])])
    write_json_atomic(tmp_path / "index.json", index)
    assert read_index(tmp_path) == json.loads(json.dumps(index))
    write_json_atomic(tmp_path / "index.json", {**index, "version": FORMAT_VERSION + 1})
    with pytest.raises(ShardError, match="format version"):
        read_index(tmp_path)
    write_json_atomic(tmp_path / "index.json", {"format": "something else"})
    with pytest.raises(ShardError, match="not a prx-run precompute index"):
        read_index(tmp_path)


def test_shard_plan_deals_items_round_robin_and_groups_buckets() -> None:
    buckets = {i: (16, 16) if i % 3 else (16, 32) for i in range(20)}
    indices = list(range(20))
    plans = [shard_plan(indices, buckets.__getitem__, rank, 2, shard_size=3) for rank in range(2)]
    assert plans[0] == shard_plan(indices, buckets.__getitem__, 0, 2, shard_size=3)  # a pure function
    # Rank 0 gets items 0, 2, 4, ...: those in bucket 16x16 cut in threes, then bucket 16x32.
    assert plans[0] == [
        ("r000-16x16-00000.safetensors", (16, 16), [2, 4, 8]),
        ("r000-16x16-00001.safetensors", (16, 16), [10, 14, 16]),
        ("r000-16x32-00000.safetensors", (16, 32), [0, 6, 12]),
        ("r000-16x32-00001.safetensors", (16, 32), [18]),
    ]
    every = sorted(i for plan in plans for _, _, members in plan for i in members)
    assert every == indices
    assert all(buckets[i] == bucket for plan in plans for _, bucket, members in plan for i in members)
    assert not {n for n, _, _ in plans[0]} & {n for n, _, _ in plans[1]}
