"""Indexing WebDataset shards (member offsets, image headers, caption keys; cached per shard)."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prx_core.data.decode import BadImage, ImageLimits, ImageSource, probe
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
from prx_webdataset.shards import resolve_shards
from prx_webdataset.tarindex import TarSample, index_tar, open_member, read_span

if TYPE_CHECKING:
    from prx_webdataset import WebDatasetConfig

logger = logging.getLogger("prx.data")

#: Bumped when the cache layout changes, so old caches are ignored rather than misread.
_CACHE_VERSION = 1

#: Per sample: the header probe result ((height, width) or a skip reason) and its JSON string keys.
Probed = tuple[tuple[int, int] | str, list[str]]


def json_caption_fields(data: bytes) -> dict[str, str | None]:
    """The string (or null) top-level fields of a sample's JSON; {} when it is not a JSON object."""
    try:
        obj = json.loads(data.decode("utf-8", errors="replace"))
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    return {str(k): v for k, v in obj.items() if isinstance(v, str) or v is None}


def _probe_sample(path: Path, sample: TarSample, limits: ImageLimits) -> Probed:
    keys: list[str] = []
    if sample.json is not None:
        fields = json_caption_fields(read_span(path, sample.json))
        keys = sorted(k for k, v in fields.items() if isinstance(v, str))
    if sample.image is None:
        return "no_image", keys
    try:
        with open_member(path, sample.image) as fh:
            return probe(fh, limits), keys
    except BadImage as err:
        return err.reason, keys


def _sample_to_json(sample: TarSample, probed: Probed) -> list[Any]:
    result, keys = probed
    return [
        sample.key,
        sample.image_ext,
        list(sample.image) if sample.image else None,
        {k: list(v) for k, v in sample.texts.items()},
        list(sample.json) if sample.json else None,
        list(result) if isinstance(result, tuple) else result,
        keys,
    ]


def _sample_from_json(row: list[Any]) -> tuple[TarSample, Probed]:
    key, ext, image, texts, js, result, keys = row
    sample = TarSample(
        key=key,
        image=(int(image[0]), int(image[1])) if image else None,
        image_ext=ext,
        texts={k: (int(v[0]), int(v[1])) for k, v in texts.items()},
        json=(int(js[0]), int(js[1])) if js else None,
    )
    probed_result: tuple[int, int] | str = result if isinstance(result, str) else (int(result[0]), int(result[1]))
    return sample, (probed_result, list(keys))


class WebDatasetSource(IndexedSource):
    """Samples from WebDataset tar shards, read by offset (see the package docstring)."""

    kind = "webdataset"

    def __init__(self, config: WebDatasetConfig, seed: int, rank: int = 0) -> None:
        cache_dir = cache_root(config.index_cache)
        if config.download_dir == "auto":
            download_dir = (cache_dir or cache_root("auto") or Path.home()) / "webdataset"
        else:
            download_dir = Path(config.download_dir).expanduser()
        shards = resolve_shards(config.shards, download_dir, progress=rank == 0)
        limits = ImageLimits(min_side=config.min_side, max_pixels=config.max_pixels)
        threads = resolve_threads(config.decode_threads)

        self._shard_paths: list[Path] = []
        self._shard_of: list[int] = []
        self._samples: list[TarSample] = []
        items: list[IndexedItem] = []
        skipped: list[tuple[str, str]] = []
        caption_keys: set[str] = set()
        content: list[str] = []
        for shard_id, (display, path) in enumerate(shards):
            label = posixpath.basename(display.rstrip("/")) or display
            probed = self._index_shard(path, limits, threads, cache_dir, rank)
            self._shard_paths.append(path)
            content.append(f"shard\t{label}\t{path.stat().st_size}\t{len(probed)}")
            for sample, (result, json_keys) in probed:
                name = f"{label}:{sample.key}"
                content.append(f"{sample.key}\t{sample.image[1] if sample.image else -1}")
                if isinstance(result, str):
                    skipped.append((name, result))
                    continue
                caption_keys.update(sample.texts)
                caption_keys.update(json_keys)
                items.append(IndexedItem(name, result[0], result[1]))
                self._shard_of.append(shard_id)
                self._samples.append(sample)
        report = IndexReport(items=items, skipped=skipped, caption_keys=tuple(caption_keys), content=content)
        super().__init__(config, seed, report)

    @staticmethod
    def _index_shard(
        path: Path, limits: ImageLimits, threads: int, cache_dir: Path | None, rank: int
    ) -> list[tuple[TarSample, Probed]]:
        stat = path.stat()
        cache_path = None
        if cache_dir is not None:
            cache_path = cache_dir / "index" / f"webdataset-{cache_key(path.resolve())}.json"
        tag = {
            "version": _CACHE_VERSION,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "limits": f"{limits.min_side}:{limits.max_pixels}",
        }
        cached = read_cache(cache_path)
        if cached is not None and all(cached.get(k) == v for k, v in tag.items()):
            try:
                return [_sample_from_json(row) for row in cached["samples"]]
            except (KeyError, TypeError, ValueError, IndexError):
                logger.warning("ignoring malformed index cache %s; re-indexing", cache_path)
        with_image, without = index_tar(path)
        samples = with_image + [TarSample(key) for key in without]
        jobs: list[Callable[[], Probed]] = [partial(_probe_sample, path, sample, limits) for sample in samples]
        found = probe_all(jobs, threads, f"indexing {path.name}", show_progress(rank, len(jobs)))
        probed = [
            (sample, result if not isinstance(result, str) else (result, []))
            for sample, result in zip(samples, found, strict=True)
        ]
        write_cache(cache_path, {**tag, "samples": [_sample_to_json(s, p) for s, p in probed]})
        return probed

    def _path(self, index: int) -> Path:
        return self._shard_paths[self._shard_of[index]]

    def _image_source(self, index: int) -> ImageSource:
        sample = self._samples[index]
        if sample.image is None:  # excluded while indexing; kept for the type checker
            raise BadImage("no_image", sample.key)
        return read_span(self._path(index), sample.image)

    def _raw_captions(self, index: int) -> Mapping[str, object]:
        sample, path = self._samples[index], self._path(index)
        captions: dict[str, object] = {}
        if sample.json is not None:
            captions.update(json_caption_fields(read_span(path, sample.json)))
        # A .txt member wins over a JSON field of the same name: it is the more specific source.
        for key, span in sample.texts.items():
            captions[key] = read_span(path, span).decode("utf-8", errors="replace")
        return {k: v for k, v in captions.items() if k in self.caption_keys}
