"""Small, realistic image datasets for tests: an image folder with a caption sidecar, and the same
as WebDataset tar shards, optionally salted with every kind of bad data a real crawl contains.

Usage::

    from prx_core.testing.image_data import write_image_folder, write_webdataset, read_manifest

    root = write_image_folder(tmp_path / "images", n=40, corrupt=True, seed=0)
    shards = write_webdataset(tmp_path / "wds", n=40, shard_size=16, corrupt=True, seed=0)
    manifest = read_manifest(root)   # name -> {"kind": ..., "expect": ...}

Images are a pure function of ``(seed, index)``: a colour gradient with a few rectangles and a
little noise (so JPEGs are not trivially small), at one of seven aspect ratios between 1:2 and
2:1 with the shorter side in [64, 128] px. Captions come under the keys ``long`` and ``short``.

With ``corrupt=True`` the first items (in a seeded shuffle) become one of :data:`CORRUPTIONS`,
each with the outcome a data source must report (``expect``): ``"skipped/<reason>"``,
``"converted/<kind>"``, ``"caption/<what>"``. The rest are clean RGB JPEG/PNG/WebP files.
``manifest.json`` in the output folder records each item's kind, expectation, pixel size and
captions, so tests compare what a source reports against what was written.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: Aspect ratios (w / h) of clean images: the 1:2 .. 2:1 range of reference.md §3's buckets.
ASPECTS = (0.5, 0.6, 0.75, 1.0, 4 / 3, 1.6, 2.0)
CAPTION_KEYS = ("long", "short")
MANIFEST = "manifest.json"

#: Corruption kind -> what a data source must report for it (index-time skips are found from the
#: header, decode-time ones only by decoding the whole file; conversions train normally).
CORRUPTIONS: dict[str, str] = {
    "zero_byte": "skipped/zero_byte",
    "garbage": "skipped/undecodable",
    "truncated_jpeg": "skipped/truncated",
    "truncated_png": "skipped/truncated",
    "tiny": "skipped/tiny",
    "huge": "skipped/huge",
    "bomb": "skipped/huge",
    "cmyk": "converted/cmyk",
    "rgba": "converted/rgba",
    "la": "converted/la",
    "palette": "converted/palette",
    "grayscale": "converted/grayscale",
    "grayscale16": "converted/grayscale16",
    "caption_empty": "skipped/no_caption",
    "caption_none": "caption/fallback",
    "caption_overlong": "caption/overlong",
}
#: Length of the overlong caption (the sources' default ``max_caption_chars`` is 2000).
OVERLONG_CHARS = 3000

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


@dataclass
class SampleSpec:
    """One item of a generated dataset."""

    index: int
    key: str  # file stem (image folder) or tar key (webdataset)
    ext: str
    kind: str  # "clean" or a key of CORRUPTIONS
    height: int
    width: int
    captions: dict[str, str | None] = field(default_factory=dict)

    @property
    def expect(self) -> str | None:
        return CORRUPTIONS.get(self.kind)

    @property
    def file(self) -> str:
        return f"{self.key}.{self.ext}"


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=keys))


def _plan(n: int, seed: int, corrupt: bool) -> list[SampleSpec]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    kinds = ["clean"] * n
    if corrupt:
        if n < 2 * len(CORRUPTIONS):
            raise ValueError(f"corrupt=True needs n >= {2 * len(CORRUPTIONS)} so clean items remain, got {n}")
        order = _rng(seed, 0).permutation(n)
        for slot, kind in zip(order, CORRUPTIONS, strict=False):
            kinds[int(slot)] = kind
    specs = []
    for i, kind in enumerate(kinds):
        rng = _rng(seed, 1, i)
        aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
        side = int(rng.integers(64, 129))
        height, width = (side, round(side * aspect)) if aspect >= 1 else (round(side / aspect), side)
        ext = ("jpg", "png", "webp", "jpg")[i % 4]
        if kind in ("truncated_jpeg", "cmyk", "grayscale", "garbage", "zero_byte"):
            ext = "jpg"
        elif kind in ("truncated_png", "rgba", "la", "palette", "grayscale16", "huge", "bomb"):
            ext = "png"
        if kind == "tiny":
            height, width = 24, 40
        names = list(_COLOURS)
        colours = [names[int(c)] for c in rng.choice(len(names), size=2, replace=False)]
        shape = ("square", "bar", "block")[int(rng.integers(3))]
        long = (
            f"A {colours[0]} {shape} on a soft {colours[1]} gradient background, photographed "
            f"at {width}x{height} pixels, item number {i}."
        )
        short = f"{colours[0]} {shape}"
        captions: dict[str, str | None] = {"long": long, "short": short}
        if kind == "caption_empty":
            captions = {"long": "", "short": None}
        elif kind == "caption_none":
            captions = {"long": None, "short": short}
        elif kind == "caption_overlong":
            captions = {"long": (long + " ") * (OVERLONG_CHARS // len(long) + 1), "short": short}
        specs.append(SampleSpec(i, f"img_{i:05d}", ext, kind, height, width, captions))
    return specs


def _pixels(spec: SampleSpec, seed: int) -> np.ndarray:
    """An RGB uint8 [H, W, 3] picture: gradient, two rectangles, a little noise."""
    rng = _rng(seed, 2, spec.index)
    h, w = spec.height, spec.width
    a = rng.integers(0, 256, size=3).astype(np.float64)
    b = rng.integers(0, 256, size=3).astype(np.float64)
    ramp_H1 = np.linspace(0.0, 1.0, h)[:, None, None]
    image = a * (1 - ramp_H1) + b * ramp_H1 + np.zeros((h, w, 3))
    for _ in range(2):
        y0, x0 = int(rng.integers(0, max(1, h // 2))), int(rng.integers(0, max(1, w // 2)))
        y1, x1 = y0 + int(rng.integers(h // 6 + 1, h // 2 + 2)), x0 + int(rng.integers(w // 6 + 1, w // 2 + 2))
        image[y0:y1, x0:x1] = rng.integers(0, 256, size=3)
    image += rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, ext: str) -> bytes:
    fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width × height`` but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def image_bytes(spec: SampleSpec, seed: int) -> bytes:
    """The file content of ``spec``: a clean image or its corruption."""
    kind = spec.kind
    if kind == "zero_byte":
        return b""
    if kind == "garbage":
        return b"<html><body>404 Not Found</body></html>\n" * 8
    if kind == "huge":
        return _png_header_only(9000, 9000)  # 81 Mpx: over max_pixels, under Pillow's own bomb limit
    if kind == "bomb":
        return _png_header_only(50_000, 50_000)  # 2.5 Gpx: Pillow raises DecompressionBombError
    rgb = Image.fromarray(_pixels(spec, seed))
    if kind == "cmyk":
        image = rgb.convert("CMYK")
    elif kind == "rgba":
        image = rgb.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(rgb.size))
    elif kind == "la":
        image = rgb.convert("LA")
    elif kind == "palette":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        image.info["transparency"] = 0
    elif kind == "grayscale":
        image = rgb.convert("L")
    elif kind == "grayscale16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    else:
        image = rgb
    data = _encode(image, spec.ext)
    if kind in ("truncated_jpeg", "truncated_png"):
        return data[: int(len(data) * 0.6)]
    return data


def _manifest(specs: list[SampleSpec], seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": seed,
        **extra,
        "items": {
            s.file: {
                "key": s.key,
                "kind": s.kind,
                "expect": s.expect,
                "height": s.height,
                "width": s.width,
                "captions": s.captions,
            }
            for s in specs
        },
    }


def write_image_folder(
    root: str | Path,
    n: int = 200,
    corrupt: bool = True,
    seed: int = 0,
    sidecar: str = "captions.jsonl",
) -> Path:
    """Write ``n`` images and a caption sidecar into ``root``; returns ``root``.

    ``sidecar`` ending in ``.jsonl`` writes one JSON object per line with a ``file`` key; ending in
    ``.csv`` writes a header row ``file,long,short``. Missing captions are ``null`` in JSONL and
    empty cells in CSV. Images sit in ``root`` and in a ``sub/`` folder (every fifth item), to
    exercise recursive listing.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specs = _plan(n, seed, corrupt)
    for spec in specs:
        if spec.index % 5 == 4:
            spec.key = f"sub/{spec.key}"
        path = root / spec.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(spec, seed))
    sidecar_path = root / sidecar
    if sidecar.endswith(".jsonl"):
        with sidecar_path.open("w", encoding="utf-8") as fh:
            for spec in specs:
                fh.write(json.dumps({"file": spec.file, **spec.captions}) + "\n")
    elif sidecar.endswith(".csv"):
        with sidecar_path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["file", *CAPTION_KEYS])
            for spec in specs:
                writer.writerow([spec.file, *(spec.captions.get(k) or "" for k in CAPTION_KEYS)])
    else:
        raise ValueError(f"sidecar must end in .jsonl or .csv, got {sidecar!r}")
    (root / MANIFEST).write_text(json.dumps(_manifest(specs, seed, {"sidecar": sidecar}), indent=1), encoding="utf-8")
    return root


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for the same seed
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(
    root: str | Path,
    n: int = 200,
    shard_size: int = 64,
    corrupt: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write ``n`` samples as WebDataset shards ``root/shard-00000.tar``, ...; returns their paths.

    Each sample ``img_00012`` has its image (``.jpg``/``.png``/``.webp``), ``.long.txt`` (caption
    key ``long``), ``.txt`` (the short caption, key ``caption``) and ``.json`` with ``short`` plus
    non-caption fields (``width``, ``height``). A missing caption is simply an absent member or a
    ``null`` JSON value. With ``corrupt=True`` the same corruptions as the image folder are
    written, plus one extra sample with captions but no image (reported as ``skipped/no_image``).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specs = _plan(n, seed, corrupt)
    paths: list[Path] = []
    for first in range(0, n, shard_size):
        path = root / f"shard-{first // shard_size:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for spec in specs[first : first + shard_size]:
                _add_member(tar, spec.file, image_bytes(spec, seed))
                long, short = spec.captions.get("long"), spec.captions.get("short")
                if long is not None:
                    _add_member(tar, f"{spec.key}.long.txt", long.encode("utf-8"))
                if short is not None:
                    _add_member(tar, f"{spec.key}.txt", short.encode("utf-8"))
                meta = {"short": short, "width": spec.width, "height": spec.height}
                _add_member(tar, f"{spec.key}.json", json.dumps(meta).encode("utf-8"))
            if corrupt and first == 0:
                _add_member(tar, "orphan_caption.txt", b"a caption without an image")
        paths.append(path)
    extra = {"shards": [p.name for p in paths], "orphans": ["orphan_caption"] if corrupt else []}
    (root / MANIFEST).write_text(json.dumps(_manifest(specs, seed, extra), indent=1), encoding="utf-8")
    return paths


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest written next to a generated dataset (see the module docstring)."""
    data: dict[str, Any] = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    return data


def tiny_recipe_with_data(directory: str | Path, data: dict[str, Any], patch: dict[str, Any] | None = None) -> Path:
    """Write the tiny test recipe with its ``[data]`` table *replaced* by ``data``; returns the path.

    The tiny recipe's ``[data]`` table holds ``synthetic_shapes`` keys (``max_shapes``) that another
    source's strict config would reject, so a merge cannot switch the source.
    """
    import copy

    from prx_core.recipe import deep_merge, dump_toml
    from prx_core.testing.fixtures import TINY_RECIPE

    tables = {k: copy.deepcopy(v) for k, v in TINY_RECIPE.items() if k != "data"}
    merged = deep_merge(deep_merge(tables, {"data": data}), patch or {})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text(dump_toml(merged), encoding="utf-8")
    return path


def train_recording_shapes(trainer: Any, steps: int) -> tuple[list[float], list[tuple[int, ...]]]:
    """Train ``steps`` steps and return the losses and the image shape of every batch the data
    source produced (wrapped on the instance only: the source's class is untouched)."""
    from prx_core.testing.fixtures import run_steps

    source = trainer.run.require("data")
    shapes: list[tuple[int, ...]] = []
    real_batch = source.batch

    def recording(request: Any) -> Any:
        batch = real_batch(request)
        shapes.append(tuple(batch.images_BCHW.shape))
        return batch

    source.batch = recording
    return run_steps(trainer, steps), shapes
