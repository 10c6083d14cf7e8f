"""The shared base of indexed sources, through a tiny in-memory source: captions, substitutes,
counters, the skip-ratio stop, the held-out split and the fingerprint."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from prx_core.data.captions import pick_caption_keys
from prx_core.data.decode import BadImage, ImageLimits, ImageSource, probe
from prx_core.data.indexed import DataQualityError, IndexedItem, IndexedSource, IndexReport
from prx_core.data.source_config import IndexedSourceConfig
from prx_core.seeding import generator_for
from prx_core.slots import BatchRequest

CONFIG = IndexedSourceConfig(
    size=128, caption_weights={"long": 1.0}, held_out=2, min_side=16, decode_threads=1, index_cache="off"
)


def png(height: int, width: int, value: int = 0, truncated: bool = False) -> bytes:
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2] if truncated else data


class MemorySource(IndexedSource):
    kind = "memory"

    def __init__(self, config: IndexedSourceConfig, seed: int, files: Mapping[str, tuple[bytes, dict[str, Any]]]):
        limits = ImageLimits(min_side=config.min_side, max_pixels=config.max_pixels)
        items, skipped = [], []
        self.data: list[bytes] = []
        self.captions: list[dict[str, Any]] = []
        self.decodes = 0
        for name, (data, captions) in files.items():
            try:
                height, width = probe(data, limits)
            except BadImage as err:
                skipped.append((name, err.reason))
                continue
            items.append(IndexedItem(name, height, width))
            self.data.append(data)
            self.captions.append(captions)
        keys = tuple(sorted({k for _, c in files.values() for k in c}))
        content = [f"{name}\t{len(data)}" for name, (data, _) in files.items()]
        super().__init__(config, seed, IndexReport(items, skipped, keys, content))

    def _image_source(self, index: int) -> ImageSource:
        self.decodes += 1
        return self.data[index]

    def _raw_captions(self, index: int) -> Mapping[str, object]:
        return self.captions[index]


def files(n: int = 24, **special: tuple[bytes, dict[str, Any]]) -> dict[str, tuple[bytes, dict[str, Any]]]:
    """``n`` squares and wides (2:1) alternating, captions "long i" / "short i"; ``special`` overrides."""
    out = {}
    for i in range(n):
        height, width = (32, 32) if i % 2 else (32, 64)
        out[f"f{i:03d}"] = (png(height, width, i), {"long": f"long {i}", "short": f"short {i}"})
    out.update(special)
    return out


def req(step: int, size: int = 4, rank: int = 0, world: int = 1, seed: int = 0) -> BatchRequest:
    return BatchRequest(step=step, micro_step=0, accumulation=1, rank=rank, world_size=world, size=size, seed=seed)


def test_batches_are_one_bucket_and_captions_follow_the_weighted_draw() -> None:
    config = replace(CONFIG, caption_weights={"long": 0.5, "short": 0.5})
    source = MemorySource(config, 5, files())
    assert source.caption_keys == ("long", "short")
    for step in range(8):
        request = req(step)
        batch = source.batch(request)
        assert batch.images_BCHW.shape[0] == 4 and batch.images_BCHW.dtype == torch.uint8
        assert tuple(batch.images_BCHW.shape[2:]) == source.bucket_of(batch.sample_ids[0])
        assert len({source.bucket_of(i) for i in batch.sample_ids}) == 1
        keys = pick_caption_keys(config.caption_weights, 4, generator_for(5, "captions", request.first_sample()))
        names = [source.name_of(i) for i in batch.sample_ids]
        assert batch.captions == [f"{k} {int(n[1:])}" for k, n in zip(keys, names, strict=True)]
    assert {source.bucket_of(i) for i in source.train_indices()} == {(128, 128), (96, 192)}


def test_bucket_sizes_follow_the_aspect() -> None:
    source = MemorySource(CONFIG, 0, files(8))
    by_name = {source.name_of(i): source.bucket_of(i) for i in range(len(source))}
    # At 128 px the buckets are 192x96, 160x96, 128x128, 96x160 and 96x192 (h x w).
    assert len(source.buckets) == 5
    assert by_name["f001"] == (128, 128)
    assert by_name["f000"] == (96, 192)  # 2:1
    square = MemorySource(replace(CONFIG, buckets=False), 0, files(8))
    assert {square.bucket_of(i) for i in range(len(square))} == {(128, 128)}


def test_missing_caption_falls_back_and_counts() -> None:
    special = {f"f{i:03d}": (png(32, 32, i), {"long": None, "short": f"short {i}"}) for i in range(0, 24, 2)}
    source = MemorySource(replace(CONFIG, buckets=False, held_out=0), 0, files(**special))
    captions = [c for step in range(6) for c in source.batch(req(step)).captions]
    stats = source.stats()
    fallbacks = sum(c.startswith("short") for c in captions)
    assert fallbacks > 0 and stats["data/caption/fallback"] == stats["data/caption/empty"] == fallbacks
    assert "data/skipped/no_caption" not in stats


def test_items_without_any_caption_are_replaced() -> None:
    special = {"f003": (png(32, 32, 3), {"long": "  ", "short": None})}
    source = MemorySource(replace(CONFIG, buckets=False, held_out=0), 0, files(**special))
    bad = next(i for i in range(len(source)) if source.name_of(i) == "f003")
    for step in range(12):
        batch = source.batch(req(step))
        assert bad not in batch.sample_ids and len(batch.captions) == 4
    stats = source.stats()
    assert stats["data/skipped/no_caption"] >= 1 and stats["data/substituted"] == stats["data/skipped/no_caption"]


def test_overlong_captions_are_truncated_and_counted() -> None:
    special = {f"f{i:03d}": (png(32, 32, i), {"long": "word " * 50}) for i in range(24)}
    source = MemorySource(replace(CONFIG, max_caption_chars=12, held_out=0, buckets=False), 0, special)
    batch = source.batch(req(0))
    assert batch.captions == ["word word wo"] * 4
    assert source.stats()["data/caption/overlong"] == 4


def test_truncated_items_get_a_same_bucket_substitute_and_are_decoded_once() -> None:
    special = {"f004": (png(32, 64, 4, truncated=True), {"long": "long 4"})}
    # Without read-ahead, so the decode count below is this request's alone.
    source = MemorySource(replace(CONFIG, held_out=0, read_ahead=False), 0, files(**special))
    bad = next(i for i in range(len(source)) if source.name_of(i) == "f004")
    for step in range(40):
        batch = source.batch(req(step))
        assert bad not in batch.sample_ids
        assert len(set(batch.sample_ids)) == 4, "a substitute never duplicates a sample of its batch"
        assert len({source.bucket_of(i) for i in batch.sample_ids}) == 1
    stats = source.stats()
    assert stats["data/skipped/truncated"] >= 2, "the bad item comes up again in later epochs"
    assert stats["data/substituted"] == stats["data/skipped/truncated"]
    decodes = source.decodes
    source.batch(req(0))  # the batch with the bad item again: it is not decoded again
    assert source.decodes == decodes + 4


def test_skip_ratio_stops_with_a_clear_message() -> None:
    special = {f"f{i:03d}": (png(32, 32, i, truncated=True), {"long": "x"}) for i in range(0, 24, 3)}
    config = replace(CONFIG, held_out=0, buckets=False, min_seen=8, max_skip_ratio=0.1)
    source = MemorySource(config, 0, files(**special))
    with pytest.raises(DataQualityError) as err:
        for step in range(20):
            source.batch(req(step))
    message = str(err.value)
    assert "max_skip_ratio = 10.0%" in message and "truncated" in message
    assert "(truncated)" in message and "f0" in message  # names the first bad files
    assert "data.max_skip_ratio" in message


def test_index_time_exclusions_count_and_can_stop_the_run() -> None:
    special = {"zero": (b"", {"long": "x"}), "tiny": (png(8, 8), {"long": "x"}), "junk": (b"GIF89a?", {"long": "x"})}
    source = MemorySource(CONFIG, 0, files(**special))
    stats = source.stats()
    assert stats["data/skipped/zero_byte"] == stats["data/skipped/tiny"] == stats["data/skipped/undecodable"] == 1
    assert stats["data/index/files"] == 27 and stats["data/index/excluded"] == 3
    with pytest.raises(DataQualityError, match=r"3 of 27 items \(11.1%\) are unusable.*zero \(zero_byte\)"):
        MemorySource(replace(CONFIG, min_seen=10), 0, files(**special))


def test_held_out_split_is_by_name_not_seed_and_never_trained() -> None:
    a = MemorySource(replace(CONFIG, held_out=3), 0, files())
    b = MemorySource(replace(CONFIG, held_out=3), 99, files())
    names = [a.name_of(i) for i in a.held_out_indices()]
    assert names == [b.name_of(i) for i in b.held_out_indices()]
    assert not set(a.held_out_indices()) & set(a.train_indices())
    assert len(a.train_indices()) == 24 - 3
    held = a.held_out(1, 2)
    assert held.images_BCHW.shape == (2, 3, 128, 128) and held.sample_ids == a.held_out_indices()[1:3]
    assert held.captions == a.held_out_captions(3)[1:3] == [f"long {int(n[1:])}" for n in names[1:3]]
    with pytest.raises(ValueError, match="only 3 are reserved"):
        a.held_out_captions(4)
    trained = {i for step in range(30) for i in a.batch(req(step)).sample_ids}
    assert not trained & set(a.held_out_indices())


def test_a_held_out_candidate_that_fails_is_replaced_and_not_trained() -> None:
    probe_source = MemorySource(replace(CONFIG, held_out=1), 0, files())
    first = probe_source.name_of(probe_source.held_out_indices()[0])
    special = {first: (png(32, 32, 1, truncated=True), {"long": "broken"})}
    source = MemorySource(replace(CONFIG, held_out=1), 0, files(**special))
    assert source.name_of(source.held_out_indices()[0]) != first
    broken = next(i for i in range(len(source)) if source.name_of(i) == first)
    assert broken not in source.train_indices()
    assert source.stats()["data/skipped/truncated"] == 1


def test_fingerprint_covers_content_config_and_seed() -> None:
    base = MemorySource(CONFIG, 0, files()).fingerprint
    assert MemorySource(CONFIG, 0, files()).fingerprint == base
    assert MemorySource(CONFIG, 1, files()).fingerprint != base
    assert MemorySource(replace(CONFIG, size=96), 0, files()).fingerprint != base
    # Content is names and byte sizes (hashing every byte of a large dataset would cost a full read).
    assert MemorySource(CONFIG, 0, files(**{"f000": (png(32, 60, 0), {"long": "x"})})).fingerprint != base


def test_resume_and_threads_give_the_same_batches() -> None:
    one = MemorySource(CONFIG, 3, files())
    expected = [one.batch(req(s)).sample_ids for s in range(10)]
    threaded = MemorySource(replace(CONFIG, decode_threads=4), 3, files())
    assert [threaded.batch(req(s)).sample_ids for s in range(5, 10)] == expected[5:]
    assert torch.equal(threaded.batch(req(2)).images_BCHW, one.batch(req(2)).images_BCHW)


def _accumulating(step: int, micro: int) -> BatchRequest:
    return BatchRequest(step=step, micro_step=micro, accumulation=2, rank=1, world_size=2, size=3, seed=0)


def test_following_request_walks_micro_steps_then_steps() -> None:
    assert _accumulating(3, 0).following() == _accumulating(3, 1)
    assert _accumulating(3, 1).following() == _accumulating(4, 0)
    assert req(7).following() == req(8)


def test_read_ahead_gives_the_same_batches_and_counts() -> None:
    # Bad data of every decode-time kind, so substitutes, the bad-item memory and the counters
    # are exercised while the next micro-batch decodes in the background.
    special = {
        "f004": (png(32, 64, 4, truncated=True), {"long": "long 4"}),
        "f007": (png(32, 32, 7, truncated=True), {"long": "long 7"}),
        "f009": (png(32, 32, 9), {}),  # no caption at all
        "f010": (png(32, 64, 10), {"short": "short only"}),  # falls back to "short"
    }
    data = files(30, **special)
    config = replace(CONFIG, held_out=0, caption_weights={"long": 0.5, "short": 0.5}, max_skip_ratio=1.0)
    plain = MemorySource(replace(config, read_ahead=False), 4, data)
    ahead = MemorySource(replace(config, decode_threads=3), 4, data)
    requests = [_accumulating(step, micro) for step in range(12) for micro in range(2)]
    for request in requests:
        expected, got = plain.batch(request), ahead.batch(request)
        assert got.sample_ids == expected.sample_ids
        assert got.captions == expected.captions
        assert got.images_BCHW is not None and expected.images_BCHW is not None
        assert torch.equal(got.images_BCHW, expected.images_BCHW)
    assert ahead.stats() == plain.stats()
    assert plain.stats()["data/skipped/truncated"] >= 2, "the bad items came up"
    assert ahead.read_ahead_hits == len(requests) - 1, "every request after the first was read ahead"
    assert plain.read_ahead_hits == 0


def test_read_ahead_for_another_request_is_dropped() -> None:
    source = MemorySource(CONFIG, 2, files())
    fresh = MemorySource(replace(CONFIG, read_ahead=False), 2, files())
    source.batch(req(0))  # reads step 1 ahead
    jumped = source.batch(req(5))  # e.g. a resume elsewhere: the read-ahead is not used
    assert source.read_ahead_hits == 0
    assert jumped.sample_ids == fresh.batch(req(5)).sample_ids
    assert source.batch(req(6)).sample_ids == fresh.batch(req(6)).sample_ids
    assert source.read_ahead_hits == 1


def test_ranks_are_disjoint() -> None:
    source = MemorySource(replace(CONFIG, buckets=False), 0, files(40))
    for step in range(3):
        ids = [i for r in range(2) for i in source.batch(req(step, size=4, rank=r, world=2)).sample_ids]
        assert len(ids) == len(set(ids)) == 8


def test_load_and_bucket_of_for_precompute() -> None:
    special = {"f005": (png(32, 32, 5), {"long": "", "short": "short 5"})}
    source = MemorySource(CONFIG, 0, files(**special))
    index = next(i for i in source.train_indices() if source.name_of(i) == "f005")
    item = source.load(index)
    assert item is not None and item.name == "f005" and item.captions == {"short": "short 5"}
    assert tuple(item.image_CHW.shape[1:]) == source.bucket_of(index)


def test_a_bucket_with_no_usable_item_is_an_error() -> None:
    special = {f"f{i:03d}": (png(32, 64, i, truncated=True), {"long": "x"}) for i in range(0, 24, 2)}
    source = MemorySource(replace(CONFIG, held_out=0, max_skip_ratio=1.0), 0, files(**special))
    with pytest.raises(DataQualityError, match="every item of bucket 96x192 is unusable"):
        for step in range(10):
            source.batch(req(step))


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="unknown caption key 'lnog'.*did you mean 'long'"):
        MemorySource(replace(CONFIG, caption_weights={"lnog": 1.0}), 0, files())
    with pytest.raises(ValueError, match="multiple of 32"):
        IndexedSourceConfig(size=100)
    with pytest.raises(ValueError, match="max_skip_ratio"):
        IndexedSourceConfig(max_skip_ratio=1.5)
    source = MemorySource(CONFIG, 0, files())
    with pytest.raises(ValueError, match="not divisible by the latent compression"):
        source.check_model_fit(64)
    with pytest.raises(ValueError, match="eval.num_samples needs 64 held-out items"):
        source.check_held_out_covers(64, "eval.num_samples")
    with pytest.raises(ValueError, match="held_out = 30"):
        MemorySource(replace(CONFIG, held_out=30), 0, files())
