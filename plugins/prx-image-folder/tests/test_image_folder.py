"""image_folder: sidecar parsing, indexing with its cache, counts by reason, and training the tiny
recipe on a generated folder with corrupted files."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from prx_image_folder import ImageFolderConfig  # noqa: E402
from prx_image_folder import source as source_module  # noqa: E402
from prx_image_folder.source import ImageFolderSource, list_images, read_sidecar  # noqa: E402

from prx_core.data.indexed import DataQualityError  # noqa: E402
from prx_core.errors import TrainingError
from prx_core.recipe import load  # noqa: E402
from prx_core.slots import BatchRequest  # noqa: E402
from prx_core.testing.fixtures import make_trainer, run_steps  # noqa: E402
from prx_core.testing.image_data import read_manifest, tiny_recipe_with_data, train_recording_shapes, write_image_folder  # noqa: E402

#: Index-time outcomes of the generated corruptions (read from headers, so excluded up front).
INDEX_REASONS = {"zero_byte": 1, "undecodable": 1, "tiny": 1, "huge": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("folder"), n=40, corrupt=True, seed=0)


def config(root: Path, cache: Path, **changes: Any) -> ImageFolderConfig:
    base = ImageFolderConfig(
        root=str(root),
        size=96,
        caption_weights={"long": 0.8, "short": 0.2},
        held_out=4,
        max_skip_ratio=0.5,
        index_cache=str(cache),
    )
    return replace(base, **changes)


def request(step: int, size: int = 4) -> BatchRequest:
    return BatchRequest(step=step, micro_step=0, accumulation=1, rank=0, world_size=1, size=size, seed=0)


def test_sidecar_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    rows = [
        {"file": "a.jpg", "long": "A long one.", "short": "a", "width": 5},
        {"file": "./sub/b.png", "long": None, "short": "b", "width": 6},
        {"file": "a.jpg", "long": "again"},
        {"file": "../escape.jpg", "long": "x"},
        {"nofile": "c.jpg"},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n", encoding="utf-8")
    parsed = read_sidecar(jsonl)
    assert parsed.caption_keys == ("long", "short")  # 'width' holds numbers: not a caption key
    assert parsed.rows == {"a.jpg": {"long": "A long one.", "short": "a"}, "sub/b.png": {"long": None, "short": "b"}}
    assert Counter(reason for _, reason in parsed.rejected) == {"duplicate_row": 1, "bad_sidecar_row": 3}

    csv_path = tmp_path / "c.csv"
    csv_path.write_text('file,long,short\na.jpg,"A, quoted\nmultiline",a\nb.png,,b\n', encoding="utf-8")
    parsed = read_sidecar(csv_path)
    assert parsed.caption_keys == ("long", "short")
    assert parsed.rows == {
        "a.jpg": {"long": "A, quoted\nmultiline", "short": "a"},
        "b.png": {"long": None, "short": "b"},
    }
    (tmp_path / "bad.csv").write_text("name,caption\nx.jpg,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'file' column"):
        read_sidecar(tmp_path / "bad.csv")


def test_listing_skips_hidden_files_and_other_extensions(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.png", "._a.jpg", "notes.txt", ".hidden/c.jpg", "sub/d.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # a link loop is listed once, not forever
    assert list(list_images(tmp_path)) == ["a.JPG", "b.png", "sub/d.webp"]


def test_index_counts_match_the_generated_corruptions(folder: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(config(folder, tmp_path), seed=0)
    stats = source.stats()
    for reason, count in INDEX_REASONS.items():
        assert stats[f"data/skipped/{reason}"] == count, reason
    assert stats["data/index/files"] == 40 and stats["data/index/excluded"] == sum(INDEX_REASONS.values())
    assert source.caption_keys == ("long", "short")
    manifest = read_manifest(folder)["items"]
    names = {source.name_of(i) for i in range(len(source))}
    for name, item in manifest.items():
        expect = item["expect"] or ""
        excluded = expect.startswith("skipped/") and expect.removeprefix("skipped/") in INDEX_REASONS
        assert (name not in names) == excluded, name
    # At 96 px the buckets are 128x64, 96x96 and 64x128 (aspects 1/2, 1, 2): in log aspect the
    # boundaries sit at 1/sqrt(2) and sqrt(2).
    assert source.buckets.sizes == ((128, 64), (96, 96), (64, 128))
    for index in range(len(source)):
        item = manifest[source.name_of(index)]
        aspect = item["width"] / item["height"]
        expected = (128, 64) if aspect < 2**-0.5 else (64, 128) if aspect > 2**0.5 else (96, 96)
        assert source.bucket_of(index) == expected, (item, aspect)


def test_an_epoch_reports_every_decode_time_problem(folder: Path, tmp_path: Path) -> None:
    source = ImageFolderSource(config(folder, tmp_path, min_seen=1000), seed=0)
    shapes = set()
    for step in range(60):  # several epochs: rotating tails reach every trainable item
        batch = source.batch(request(step))
        shapes.add(tuple(batch.images_BCHW.shape))
    assert all(s[0] == 4 and s[2:] in source.buckets.sizes for s in shapes)
    stats = source.stats()
    assert stats["data/skipped/truncated"] >= 2 and stats["data/skipped/no_caption"] >= 1
    converted = {k.removeprefix("data/converted/") for k in stats if k.startswith("data/converted/")}
    assert len(converted) >= 4, converted
    assert stats["data/caption/overlong"] >= 1
    # Every bad slot got a substitute; a substitute may be bad too, so skips can outnumber them.
    assert 1 <= stats["data/substituted"] <= stats["data/load_skipped"]


def test_index_cache_is_reused_and_invalidated_by_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_image_folder(tmp_path / "data", n=40, corrupt=True, seed=1)
    cache = tmp_path / "cache"
    first = ImageFolderSource(config(root, cache), seed=0)
    assert len(list((cache / "index").glob("image_folder-*.json"))) == 1
    probed: list[Path] = []
    real_probe = source_module.probe

    def counting_probe(path: Path, limits: Any) -> tuple[int, int]:
        probed.append(Path(path))
        return real_probe(path, limits)

    monkeypatch.setattr(source_module, "probe", counting_probe)
    again = ImageFolderSource(config(root, cache), seed=0)
    assert probed == [] and again.fingerprint == first.fingerprint
    # Rewrite one image with different bytes: only it is read again, and the fingerprint changes.
    manifest = read_manifest(root)["items"]
    name = next(n for n, item in manifest.items() if item["kind"] == "clean")
    (root / name).write_bytes((root / name).read_bytes() + b"\0" * 10)
    changed = ImageFolderSource(config(root, cache), seed=0)
    assert probed == [root / name] and changed.fingerprint != first.fingerprint
    # Different limits invalidate the cache as a whole.
    probed.clear()
    ImageFolderSource(config(root, cache, min_side=32), seed=0)
    assert len(probed) > 30


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="root"):
        ImageFolderConfig(root="")
    with pytest.raises(ValueError, match=r"\.jsonl or \.csv"):
        ImageFolderConfig(root="x", captions="captions.txt")
    with pytest.raises(ValueError, match="multiple of 32"):
        ImageFolderConfig(root="x", size=100)
    ImageFolderConfig(root="x", size=100, buckets=False)


def test_missing_folder_and_sidecar_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        ImageFolderSource(ImageFolderConfig(root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderSource(ImageFolderConfig(root=str(tmp_path)), seed=0)


def _recipe(tmp_path: Path, root: Path, patch: int = 16, **data: Any) -> Any:
    table = {
        "use": "image_folder",
        "root": str(root),
        "size": 96,
        "caption_weights": {"long": 0.8, "short": 0.2},
        "held_out": 4,
        "max_skip_ratio": 0.5,
        "index_cache": str(tmp_path / "cache"),
        **data,
    }
    return load(tiny_recipe_with_data(tmp_path / "recipe", table, {"model": {"patch_size": patch}}))


def test_trains_the_tiny_recipe_with_bad_files(folder: Path, tmp_path: Path) -> None:
    trainer = make_trainer(_recipe(tmp_path, folder), tmp_path / "run")
    source = trainer.run.require("data")
    losses, shapes = train_recording_shapes(trainer, 4)
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert len(shapes) == 4 and all(s[0] == 4 and s[2:] in source.buckets.sizes for s in shapes)
    stats = source.stats()
    for reason, count in INDEX_REASONS.items():
        assert stats[f"data/skipped/{reason}"] == count
    assert trainer.run.require("data").held_out_captions(2)


def test_too_much_bad_data_stops_training(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", n=40, corrupt=False, seed=2)
    for name in sorted(p for p in read_manifest(root)["items"])[:6]:
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])  # truncated downloads
    trainer = make_trainer(_recipe(tmp_path, root, max_skip_ratio=0.05, min_seen=8), tmp_path / "run")
    with pytest.raises(DataQualityError, match=r"were skipped, more than max_skip_ratio = 5\.0%.*truncated"):
        run_steps(trainer, 10)


def test_recipe_checks_at_build(folder: Path, tmp_path: Path) -> None:
    # A plugin's ValueError at build time reaches prx-run as one line: "cannot build data '…': …".
    with pytest.raises(TrainingError, match="cannot build data 'image_folder': .*eval.num_samples needs 4 held-out"):
        make_trainer(_recipe(tmp_path / "a", folder, held_out=2), tmp_path / "a" / "run")
    # 128 px passes the recipe's size check with patch 64, but the 96-px sides of its buckets do not.
    with pytest.raises(TrainingError, match="bucket sizes .*96.* not divisible by the latent compression"):
        make_trainer(_recipe(tmp_path / "b", folder, patch=64, size=128), tmp_path / "b" / "run")
