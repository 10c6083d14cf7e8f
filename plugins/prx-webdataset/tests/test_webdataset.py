"""webdataset: brace ranges, tar indexing by offset, downloads, captions from members, counts by
reason, the index cache, and training the tiny recipe on shards with corrupted samples."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import http.server  # noqa: E402
import io  # noqa: E402
import tarfile  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from prx_webdataset import WebDatasetConfig  # noqa: E402
from prx_webdataset import source as source_module  # noqa: E402
from prx_webdataset.shards import download, expand_braces, resolve_shards  # noqa: E402
from prx_webdataset.source import WebDatasetSource, json_caption_fields  # noqa: E402
from prx_webdataset.tarindex import index_tar, open_member, read_span, split_name  # noqa: E402

from prx_core.data.indexed import DataQualityError  # noqa: E402
from prx_core.recipe import load  # noqa: E402
from prx_core.slots import BatchRequest  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps  # noqa: E402
from prx_core.testing.image_data import read_manifest, tiny_recipe_with_data, train_recording_shapes, write_webdataset  # noqa: E402

#: Index-time outcomes of the generated corruptions, plus the one sample without an image.
INDEX_REASONS = {"zero_byte": 1, "undecodable": 1, "tiny": 1, "huge": 2, "no_image": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_webdataset(tmp_path_factory.mktemp("wds"), n=40, shard_size=16, corrupt=True, seed=0)


def config(paths: list[Path], cache: Path, **changes: Any) -> WebDatasetConfig:
    base = WebDatasetConfig(
        shards=tuple(str(p) for p in paths) or ("unused.tar",),
        size=96,
        caption_weights={"long": 0.8, "short": 0.2},
        held_out=4,
        max_skip_ratio=0.5,
        index_cache=str(cache),
    )
    return replace(base, **changes)


def request(step: int, size: int = 4) -> BatchRequest:
    return BatchRequest(step=step, micro_step=0, accumulation=1, rank=0, world_size=1, size=size, seed=0)


def test_expand_braces() -> None:
    assert expand_braces("s-{000..003}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar", "s-003.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{key}-{8..10}") == ["{key}-8", "{key}-9", "{key}-10"]


def test_split_name_uses_the_first_dot_of_the_file_name() -> None:
    assert split_name("a/b.c/img_001.long.txt") == ("a/b.c/img_001", "long.txt")
    assert split_name("img.JPG") == ("img", "jpg")
    assert split_name("README") == ("README", "")


def _tar(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_index_tar_reads_members_by_offset(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(
        _tar(
            {
                "x/k1.png": b"PNG-BYTES",
                "x/k1.jpg": b"JPG-BYTES",
                "x/k1.txt": b"plain caption",
                "x/k1.long.txt": b"a long caption",
                "x/k1.json": b'{"short": "s", "n": 3}',
                "k2.txt": b"no image here",
                "._k3.jpg": b"resource fork",
            }
        )
    )
    samples, without = index_tar(path)
    assert [s.key for s in samples] == ["x/k1"] and without == ["k2"]
    sample = samples[0]
    assert sample.image_ext == "jpg" and read_span(path, sample.image) == b"JPG-BYTES"  # jpg preferred over png
    assert {k: read_span(path, v) for k, v in sample.texts.items()} == {
        "caption": b"plain caption",
        "long": b"a long caption",
    }
    assert json_caption_fields(read_span(path, sample.json)) == {"short": "s"}
    with open_member(path, sample.texts["long"]) as fh:
        assert fh.read(2) == b"a " and fh.seek(-7, io.SEEK_END) == 7 and fh.read() == b"caption"
        fh.seek(0)
        assert fh.read() == b"a long caption"


def test_compressed_shards_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uncompressed"):
        WebDatasetConfig(shards=("a.tar.gz",))
    path = tmp_path / "hidden_gzip.tar"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("a.txt"), io.BytesIO(b""))
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        index_tar(path)


def test_resolve_shards_globs_ranges_and_missing(shards: list[Path], tmp_path: Path) -> None:
    folder = shards[0].parent
    by_glob = resolve_shards([str(folder / "shard-*.tar")], tmp_path, progress=False)
    by_range = resolve_shards([str(folder / "shard-{00000..00002}.tar"), str(shards[0])], tmp_path, progress=False)
    assert [p for _, p in by_glob] == [p for _, p in by_range] == shards  # duplicates dropped
    with pytest.raises(ValueError, match="matches no file"):
        resolve_shards([str(folder / "nope-*.tar")], tmp_path, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_shards([str(folder / "nope.tar")], tmp_path, progress=False)


@pytest.fixture
def http_server(shards: list[Path]) -> Iterator[str]:
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(shards[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_url_shards_download_once(shards: list[Path], http_server: str, tmp_path: Path) -> None:
    url = f"{http_server}/{shards[1].name}"
    first = download(url, tmp_path / "dl", progress=False)
    assert first.read_bytes() == shards[1].read_bytes()
    assert not list((tmp_path / "dl").glob("*.part-*")), "no temporary file is left behind"
    mtime = first.stat().st_mtime_ns
    assert download(url, tmp_path / "dl", progress=False) == first and first.stat().st_mtime_ns == mtime
    with pytest.raises(OSError):
        download(f"{http_server}/missing.tar", tmp_path / "dl", progress=False)
    assert not list((tmp_path / "dl").glob("*.part-*"))
    # A whole source from URLs, with a brace range, into the configured download folder.
    cfg = config(
        [],
        tmp_path / "cache",
        shards=(f"{http_server}/shard-{{00000..00002}}.tar",),
        download_dir=str(tmp_path / "dl2"),
    )
    source = WebDatasetSource(cfg, seed=0)
    assert len(list((tmp_path / "dl2").glob("*.tar"))) == 3 and len(source) == 40 - 5


def test_index_counts_and_caption_sources(shards: list[Path], tmp_path: Path) -> None:
    source = WebDatasetSource(config(shards, tmp_path), seed=0)
    stats = source.stats()
    for reason, count in INDEX_REASONS.items():
        assert stats[f"data/skipped/{reason}"] == count, reason
    assert stats["data/index/files"] == 41
    # .txt -> "caption", .long.txt -> "long", JSON string fields -> "short" (numbers are not captions).
    assert source.caption_keys == ("caption", "long", "short")
    by_key = {item["key"]: item for item in read_manifest(shards[0].parent)["items"].values()}
    index = next(i for i in source.train_indices() if by_key[source.name_of(i).split(":", 1)[1]]["kind"] == "clean")
    item = by_key[source.name_of(index).split(":", 1)[1]]
    loaded = source.load(index)
    assert loaded is not None
    assert loaded.captions == {
        "caption": item["captions"]["short"],
        "long": item["captions"]["long"],
        "short": item["captions"]["short"],
    }
    assert tuple(loaded.image_CHW.shape[1:]) == source.bucket_of(index)


def test_an_epoch_reports_decode_time_problems(shards: list[Path], tmp_path: Path) -> None:
    source = WebDatasetSource(config(shards, tmp_path, min_seen=1000), seed=0)
    for step in range(60):
        batch = source.batch(request(step))
        assert batch.images_BCHW.shape[0] == 4 and tuple(batch.images_BCHW.shape[2:]) in source.buckets.sizes
    stats = source.stats()
    assert stats["data/skipped/truncated"] >= 2 and stats["data/skipped/no_caption"] >= 1
    assert stats["data/caption/overlong"] >= 1
    assert len([k for k in stats if k.startswith("data/converted/")]) >= 4


def test_index_cache_is_reused(shards: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = WebDatasetSource(config(shards, tmp_path), seed=0)
    assert len(list((tmp_path / "index").glob("webdataset-*.json"))) == len(shards)

    def no_indexing(path: Path) -> Any:
        raise AssertionError(f"{path} was indexed again")

    monkeypatch.setattr(source_module, "index_tar", no_indexing)
    again = WebDatasetSource(config(shards, tmp_path), seed=0)
    assert again.fingerprint == first.fingerprint and again.train_indices() == first.train_indices()


def _recipe(tmp_path: Path, shards: list[Path], **data: Any) -> Any:
    table = {
        "use": "webdataset",
        "shards": [str(p) for p in shards],
        "size": 96,
        "caption_weights": {"long": 0.5, "short": 0.3, "caption": 0.2},
        "held_out": 4,
        "max_skip_ratio": 0.5,
        "index_cache": str(tmp_path / "cache"),
        **data,
    }
    return load(tiny_recipe_with_data(tmp_path / "recipe", table, {"model": {"patch_size": 16}}))


def test_trains_the_tiny_recipe_on_shards_with_bad_samples(shards: list[Path], tmp_path: Path) -> None:
    trainer = make_trainer(_recipe(tmp_path, shards), tmp_path / "run")
    source = trainer.run.require("data")
    losses, shapes = train_recording_shapes(trainer, 4)
    assert len(losses) == 4
    assert len(shapes) == 4 and all(s[0] == 4 and s[2:] in source.buckets.sizes for s in shapes)
    for reason, count in INDEX_REASONS.items():
        assert source.stats()[f"data/skipped/{reason}"] == count


def test_too_much_bad_data_stops_training(tmp_path: Path) -> None:
    shards = write_webdataset(tmp_path / "clean", n=40, shard_size=40, corrupt=False, seed=4)
    # Rewrite the shard with a third of the images cut in half (same member layout otherwise).
    with tarfile.open(shards[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    images = sorted(n for n in members if n.endswith((".jpg", ".png")))  # headers intact: found at decode
    for name in images[::3]:
        members[name] = members[name][: len(members[name]) // 2]
    shards[0].write_bytes(_tar(members))
    with pytest.raises(DataQualityError, match=r"max_skip_ratio = 5\.0%.*first bad items: shard-00000\.tar:img_"):
        trainer = make_trainer(_recipe(tmp_path, shards, max_skip_ratio=0.05, min_seen=8), tmp_path / "run")
        run_steps(trainer, 10)
