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
    SAMPLES_FILE,
    ProgressLog,
    ShardError,
    ShardReader,
    assemble_index,
    key_mask,
    pack_strings,
    read_index,
    read_samples,
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
        "key_masks": [1 if i % 2 else 3 for i in ids],  # odd ids: "long" only; even: "long" and "short"
        "skipped": skipped or [],
        "features": {"repa:x:2x2": [4, 8]} if ids else {},
    }


def test_index_lists_samples_by_id_with_their_shard_and_row() -> None:
    records = [
        _record("r001-16x16-00000.safetensors", (16, 16), [7, 3]),
        _record("r000-16x16-00000.safetensors", (16, 16), [4, 0], skipped=[2]),
        _record("r000-16x32-00000.safetensors", (16, 32), [], skipped=[6]),  # every item failed: no file
    ]
    index, table = assemble_index({"mode": "sample", "caption_keys": ["long", "short"]}, records)
    assert (index["format"], index["version"], index["mode"]) == (FORMAT, FORMAT_VERSION, "sample")
    assert [s["file"] for s in index["shards"]] == ["r000-16x16-00000.safetensors", "r001-16x16-00000.safetensors"]
    assert index["shards"][0] == {
        "file": "r000-16x16-00000.safetensors",
        "bucket": [16, 16],
        "rows": 2,
        "features": ["repa:x:2x2"],
    }
    assert index["samples"] == {"file": SAMPLES_FILE, "count": 4}
    # Columns sorted by id: shard number, row within it, caption-key bit mask.
    assert table["ids"].tolist() == [0, 3, 4, 7]
    assert table["shard"].tolist() == [0, 1, 0, 1]
    assert table["row"].tolist() == [1, 1, 0, 0]
    assert table["caption_keys"].tolist() == [3, 1, 3, 1]
    assert index["skipped_ids"] == [2, 6] and index["skipped_at_encode"] == 2
    with pytest.raises(ShardError, match="same sample id"):
        assemble_index({}, [*records, _record("r002-16x16-00000.safetensors", (16, 16), [3])])


def test_index_round_trips_and_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="run prx-run precompute"):
        read_index(tmp_path)
    (tmp_path / "progress").mkdir()
    with pytest.raises(ShardError, match="incomplete: rerun the same prx-run precompute command"):
        read_index(tmp_path)
    index, table = assemble_index({"mode": "mode"}, [_record("a.safetensors", (8, 8), [1])])
    write_json_atomic(tmp_path / "index.json", index)
    write_tensors_atomic(tmp_path / SAMPLES_FILE, table)
    assert {k: v.tolist() for k, v in read_samples(tmp_path, index).items()} == {
        "ids": [1],
        "shard": [0],
        "row": [0],
        "caption_keys": [1],
    }
    with pytest.raises(ShardError, match="says 2"):
        read_samples(tmp_path, {**index, "samples": {"file": SAMPLES_FILE, "count": 2}})
    assert read_index(tmp_path) == json.loads(json.dumps(index))
    write_json_atomic(tmp_path / "index.json", {**index, "version": FORMAT_VERSION + 1})
    with pytest.raises(ShardError, match="format version"):
        read_index(tmp_path)
    write_json_atomic(tmp_path / "index.json", {"format": "something else"})
    with pytest.raises(ShardError, match="not a prx-run precompute index"):
        read_index(tmp_path)


def test_packed_strings_read_back_row_by_row(tmp_path: Path) -> None:
    texts = ["a long caption", "", "ünïcödé ✓ 日本", "x" * 3000, ""]
    utf8, offsets = pack_strings(texts)
    assert utf8.dtype == torch.uint8 and offsets.tolist()[0] == 0 and offsets.tolist()[-1] == utf8.numel()
    write_tensors_atomic(tmp_path / "s.safetensors", {"captions.long.utf8": utf8, "captions.long.offsets": offsets})
    reader = ShardReader(tmp_path)
    assert reader.strings("s.safetensors", "captions.long", [3, 0, 2, 1, 0]) == [texts[i] for i in [3, 0, 2, 1, 0]]
    empty_utf8, empty_offsets = pack_strings(["", ""])
    write_tensors_atomic(tmp_path / "e.safetensors", {"names.utf8": empty_utf8, "names.offsets": empty_offsets})
    assert reader.strings("e.safetensors", "names", [1, 0]) == ["", ""]
    with pytest.raises(ShardError, match="no string column 'captions.short'"):
        reader.strings("s.safetensors", "captions.short", [0])


def test_key_mask_sets_one_bit_per_present_key() -> None:
    keys = ["long", "medium", "short"]
    assert key_mask({"long": "x", "short": "y"}, keys) == 0b101
    assert key_mask([], keys) == 0
    assert key_mask(["medium", "unknown"], keys) == 0b010


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
