"""The shared base of the indexed image sources (``image_folder``, ``webdataset``).

A source first *indexes* its data: it lists every item, reads each image's header (size, and
header-level problems: zero-byte, undecodable, tiny, huge) and finds its captions. Items that fail
there are counted by reason and excluded. :class:`IndexedSource` then does everything else, the
same way for every format:

* **buckets**: each item goes to the aspect-ratio bucket closest to its header size
  (:mod:`prx_core.data.buckets`);
* **held-out split**: the ``held_out`` items with the smallest hash of their *name* (not of the
  seed: evaluation stays comparable across seeds), each fully decoded once to make sure it works,
  are reserved for evaluation and sample grids and never trained on;
* **order**: :class:`~prx_core.data.order.OrderPlan` over the training items, so a micro-batch is
  a pure function of the request and holds one bucket;
* **captions**: one key per sample drawn with the caption weights from a generator keyed by the
  request (a resumed run draws the same); a missing or empty caption falls back to another key;
* **bad data at decode time** (truncated files, items without any caption): the slot gets a
  deterministic substitute from the same bucket (the next item of that bucket's permutation in
  this epoch), so every rank still returns a full batch of one shape;
* **read-ahead**: while one micro-batch trains, the next one's images decode in the pool
  (``read_ahead``); only the pure decoding runs ahead, so batches are identical either way;
* **counting**: every skip, conversion and caption problem is counted by reason in
  :meth:`IndexedSource.stats`; past ``max_skip_ratio`` the source stops with an error naming
  the ratio, the counts and the first bad items, rather than train on a broken dataset.

Precomputation (``prx-run precompute``) uses the same interface: :meth:`train_indices`,
:meth:`bucket_of`, :meth:`load`, :meth:`held_out_indices` and :meth:`stats`.

Counters are per process (per rank); they count events, so an item that fails in two epochs
counts twice (and is only decoded once: failures are remembered).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from prx_core.data.buckets import Buckets
from prx_core.data.captions import pick_caption_keys, validate_caption_weights
from prx_core.data.decode import BadImage, Decoded, ImageLimits, ImageSource, decode
from prx_core.data.order import OrderPlan
from prx_core.data.source_config import IndexedSourceConfig
from prx_core.seeding import generator_for

if TYPE_CHECKING:
    import torch

    from prx_core.slots import BatchRequest, RawBatch

logger = logging.getLogger("prx.data")

T = TypeVar("T")

#: How many bad item names an error message lists.
_EXAMPLES = 8
#: Index more items than this and a progress bar shows (on a terminal, on rank 0).
_PROGRESS_MIN_ITEMS = 2000


class DataQualityError(RuntimeError):
    """Too much of the data is unusable (``max_skip_ratio``), or a bucket has no usable item."""


@dataclass
class LoadedItem:
    """One decoded item: the image fitted to its bucket, and every non-empty caption."""

    image_CHW: torch.Tensor  # uint8, already resized/cropped to bucket_of(index)
    captions: dict[str, str]  # every non-empty caption key of this item (overlong ones truncated)
    name: str  # file name or tar key, for error messages


@dataclass(frozen=True)
class IndexedItem:
    """An item that passed the index-time checks: its name and oriented header size."""

    name: str
    height: int
    width: int


@dataclass
class IndexReport:
    """What a source's indexer found; item ``i`` here is item ``i`` of the source."""

    items: list[IndexedItem]
    #: (name, reason) of every candidate excluded while indexing.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    caption_keys: tuple[str, ...] = ()
    #: Strings identifying the data content (file names and byte sizes ...), for the fingerprint.
    content: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- index cache files


def cache_root(setting: str) -> Path | None:
    """The cache directory an ``index_cache`` setting names ("auto", "off" or a directory)."""
    if setting == "off":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("PRX_CACHE_DIR"):
        return Path(os.environ["PRX_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prx"


def cache_key(*parts: object) -> str:
    return hashlib.blake2b("\0".join(str(p) for p in parts).encode(), digest_size=10).hexdigest()


def read_cache(path: Path | None) -> dict[str, Any] | None:
    """A cached index, or None when there is none or it is unreadable (it is then rebuilt)."""
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable index cache %s (%s); re-indexing", path, err)
        return None
    return data if isinstance(data, dict) else None


def write_cache(path: Path | None, data: Mapping[str, Any]) -> None:
    """Write a cache file atomically (ranks may race; the last complete file wins)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache costs a re-index next time, never the run
        logger.warning("could not write index cache %s: %s", path, err)


def show_progress(rank: int, total: int) -> bool:
    return rank == 0 and total >= _PROGRESS_MIN_ITEMS and sys.stderr.isatty()


def resolve_threads(setting: int) -> int:
    return setting if setting > 0 else max(1, min(8, os.cpu_count() or 1))


def probe_all(jobs: Sequence[Callable[[], T]], threads: int, desc: str, progress: bool) -> list[T | str]:
    """Run index-time jobs (header probes) in parallel, in job order.

    A job that raises :class:`BadImage` gives its reason instead of a result; a vanished file
    gives ``missing_file`` and any other read error ``unreadable``.
    """

    def one(job: Callable[[], T]) -> T | str:
        try:
            return job()
        except BadImage as err:
            return err.reason
        except FileNotFoundError:
            return "missing_file"
        except OSError:
            return "unreadable"

    if not jobs:
        return []
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(one, jobs, chunksize=64)
        return list(tqdm(results, total=len(jobs), desc=desc, disable=not progress, unit="img"))


# --------------------------------------------------------------------------- the base


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def _percent(x: float) -> str:
    return f"{100.0 * x:.1f}%"


Fetched = tuple[Decoded | BadImage, dict[str, str]]


@dataclass
class _ReadAhead:
    """Decodes of one future micro-batch, submitted to the pool before it is asked for."""

    request: BatchRequest
    indices: tuple[int, ...]
    target: tuple[int, int]
    futures: list[Future[Fetched]]


class IndexedSource:
    """Base of the indexed image sources; subclasses index their data and read bytes.

    A subclass builds an :class:`IndexReport`, keeps whatever locates item ``i`` (a path, tar
    offsets), then calls ``IndexedSource.__init__``; it implements :meth:`_image_source` and
    :meth:`_raw_captions`, both called from worker threads (so they must not share file handles).
    """

    #: Source name, for messages and the fingerprint.
    kind = "indexed"

    fingerprint: str
    caption_keys: tuple[str, ...]

    def __init__(self, config: IndexedSourceConfig, seed: int, report: IndexReport) -> None:
        self.config = config
        self.seed = seed
        self.limits = ImageLimits(min_side=config.min_side, max_pixels=config.max_pixels)
        self.buckets = Buckets(config.size, enabled=config.buckets)
        self.caption_keys = tuple(sorted(report.caption_keys))
        try:
            self._weights = validate_caption_weights(config.caption_weights, available=self.caption_keys)
        except ValueError as err:
            raise ValueError(f"{self.kind}: data.caption_weights: {err}") from None
        # Fallback order for a missing caption: weighted keys (heaviest first), then the others.
        weighted = sorted((k for k, w in self._weights.items() if w > 0), key=lambda k: (-self._weights[k], k))
        self._fallback = tuple(weighted) + tuple(k for k in self.caption_keys if k not in weighted)
        self._names = [item.name for item in report.items]
        self._hw_N2 = np.array([(item.height, item.width) for item in report.items], dtype=np.int64).reshape(-1, 2)
        self._bucket_N = self.buckets.assign(self._hw_N2[:, 0], self._hw_N2[:, 1])
        self._counts: Counter[str] = Counter()
        self._bad_examples: list[str] = []
        self._known_bad: dict[int, str] = {}
        self._plans: dict[int, OrderPlan] = {}
        self._threads = resolve_threads(config.decode_threads)
        self._pool: ThreadPoolExecutor | None = None
        #: The next micro-batch's decodes, running in the pool while this one trains (read-ahead).
        self._ahead: _ReadAhead | None = None
        #: Micro-batches served from the read-ahead (for tests and bench/data_read_ahead.py).
        self.read_ahead_hits = 0

        self._counts["index/files"] = len(report.items) + len(report.skipped)
        for name, reason in report.skipped:
            self._counts[f"skipped/{reason}"] += 1
            self._counts["index/excluded"] += 1
            self._note_bad(name, reason)
        if report.skipped:
            by_reason = Counter(reason for _, reason in report.skipped)
            logger.info(
                "%s: %d of %d items excluded while indexing (%s)",
                self.kind,
                len(report.skipped),
                self._counts["index/files"],
                ", ".join(f"{r} {n}" for r, n in sorted(by_reason.items())),
            )
        self._check_index_ratio()
        self.fingerprint = self._make_fingerprint(report.content)

        self._held_out, self._held_out_captions, examined = self._select_held_out()
        train = np.setdiff1d(np.arange(len(self._names), dtype=np.int64), np.array(sorted(examined), dtype=np.int64))
        if len(train) == 0:
            raise DataQualityError(f"{self.kind}: no items left for training after the held-out split")
        self._train_N = train

    # ------------------------------------------------------------------ subclass interface

    def _image_source(self, index: int) -> ImageSource:
        """The image of item ``index``: a path, its bytes, or a binary file (called in threads)."""
        raise NotImplementedError

    def _raw_captions(self, index: int) -> Mapping[str, object]:
        """Caption key -> raw value (a string, or None/empty when missing) (called in threads)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the IndexedSource interface

    def train_indices(self) -> list[int]:
        """Items in the training split, after index-time exclusions and the held-out split."""
        return [int(i) for i in self._train_N]

    def held_out_indices(self) -> list[int]:
        """Items reserved for evaluation, in their fixed order."""
        return list(self._held_out)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """``(height_px, width_px)`` item ``index`` is resized and cropped to."""
        return self.buckets.size_of(int(self._bucket_N[index]))

    def name_of(self, index: int) -> str:
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)

    def load(self, index: int) -> LoadedItem | None:
        """Item ``index`` at its bucket size; None when it is bad at decode time (counted)."""
        return self._count(index, self._fetch(index, self.bucket_of(index)))

    def stats(self) -> dict[str, float]:
        """Cumulative counters (``data/skipped/<reason>``, ``data/converted/<kind>``,
        ``data/caption/{empty,fallback,overlong}``, ``data/substituted`` ...) and skip ratios."""
        out = {f"data/{k}": float(v) for k, v in sorted(self._counts.items())}
        loaded = self._counts["loaded"]
        out["data/loaded"] = float(loaded)
        out["data/load_skipped"] = float(self._counts["load_skipped"])
        out["data/skip_ratio"] = self._counts["load_skipped"] / loaded if loaded else 0.0
        files = self._counts["index/files"]
        out["data/index/skip_ratio"] = self._counts["index/excluded"] / files if files else 0.0
        out["data/train_items"] = float(len(self._train_N))
        out["data/held_out_items"] = float(len(self._held_out))
        return out

    # ------------------------------------------------------------------ the DataSource protocol

    def batch(self, request: BatchRequest) -> RawBatch:
        import torch

        from prx_core.slots import RawBatch

        plan, chunk, indices = self._resolve(request)
        keys = pick_caption_keys(
            self._weights, request.size, generator_for(self.seed, "captions", request.first_sample())
        )
        target = self.bucket_of(indices[0])
        fetched = self._take_ahead(request, indices, target) or self._fetch_many(indices, target)
        if self.config.read_ahead:
            self._read_ahead(request.following())
        images: list[torch.Tensor] = []
        captions: list[str] = []
        sample_ids: list[int] = []
        for slot, (index, key) in enumerate(zip(indices, keys, strict=True)):
            item = self._count(index, fetched[slot])
            text = self._choose_caption(item, key) if item is not None else None
            if item is not None and text is None:
                self._skip(index, "no_caption")
            if item is None or text is None:
                index, item, text = self._substitute(plan, chunk, slot, key, target, used=set(sample_ids))
            images.append(item.image_CHW)
            captions.append(text)
            sample_ids.append(index)
        return RawBatch(images_BCHW=torch.stack(images), captions=captions, sample_ids=sample_ids)

    def held_out_captions(self, n: int) -> list[str]:
        self._check_held_out(0, n)
        return list(self._held_out_captions[:n])

    def held_out(self, start: int, n: int) -> RawBatch:
        """Held-out items ``start .. start + n`` as square ``size`` center crops, with captions."""
        import torch

        from prx_core.slots import RawBatch
        from prx_core.transfer import images_to_float

        self._check_held_out(start, n)
        size = self.config.size
        indices = self._held_out[start : start + n]
        images = []
        for index, fetched in zip(indices, self._fetch_many(indices, (size, size)), strict=True):
            image, _ = fetched
            if isinstance(image, BadImage):  # it decoded when the split was made: the file changed
                raise DataQualityError(f"{self.kind}: held-out item {self._names[index]!r} no longer decodes: {image}")
            images.append(image.image_CHW)
        return RawBatch(
            # Evaluation compares these with generated images: float32 in [0, 1], as held_out promises.
            images_BCHW=images_to_float(torch.stack(images)),
            captions=list(self._held_out_captions[start : start + n]),
            sample_ids=list(indices),
        )

    # ------------------------------------------------------------------ checks for the factory

    def check_model_fit(self, multiple: int) -> None:
        """Every bucket side must divide into latent pixels × patch size (``multiple``)."""
        bad = [f"{h}x{w}" for h, w in self.buckets.sizes if h % multiple or w % multiple]
        if bad:
            raise ValueError(
                f"{self.kind}: bucket sizes {', '.join(bad)} are not divisible by the latent compression × "
                f"patch size = {multiple}; pick a size (and patch size) so they are"
            )

    def check_held_out_covers(self, needed: int, what: str) -> None:
        if needed > len(self._held_out):
            raise ValueError(
                f"{self.kind}: {what} needs {needed} held-out items but only {len(self._held_out)} are reserved "
                f"(data.held_out = {self.config.held_out}); raise data.held_out or lower {what}"
            )

    # ------------------------------------------------------------------ internals

    def _resolve(self, request: BatchRequest) -> tuple[OrderPlan, int, list[int]]:
        """The order plan, chunk and item indices of ``request`` (pure)."""
        plan = self._plan(request.size)
        chunk = request.first_sample() // request.size
        return plan, chunk, [int(self._train_N[p]) for p in plan.chunk(chunk)]

    def _read_ahead(self, request: BatchRequest) -> None:
        """Start decoding ``request``'s items in the pool, to be taken by the next :meth:`batch`.

        Only the decoding runs ahead: it is a pure function of (item, bucket), so the batch is
        the same with or without it. Counting, caption choice and substitutes stay in ``batch``
        on the calling thread, in request order, so counters and the bad-item memory see the
        same sequence of events either way.
        """
        self._drop_ahead()
        _, _, indices = self._resolve(request)
        target = self.bucket_of(indices[0])
        pool = self._ensure_pool()
        futures = [pool.submit(self._fetch, index, target) for index in indices]
        self._ahead = _ReadAhead(request, tuple(indices), target, futures)

    def _take_ahead(self, request: BatchRequest, indices: list[int], target: tuple[int, int]) -> list[Fetched] | None:
        """The read-ahead decodes when they are for exactly this request; None otherwise."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if (ahead.request, ahead.indices, ahead.target) != (request, tuple(indices), target):
            self._ahead = ahead
            self._drop_ahead()
            return None
        fetched = [future.result() for future in ahead.futures]
        self.read_ahead_hits += 1
        # An item found bad since its read-ahead started (e.g. no usable caption in an earlier
        # slot) must read as known-bad, as a decode started now would.
        return [
            (BadImage(self._known_bad[index], "known bad"), {}) if index in self._known_bad else result
            for index, result in zip(indices, fetched, strict=True)
        ]

    def _drop_ahead(self) -> None:
        """Forget a read-ahead nobody will take (a different request came): cancel what has not started."""
        if self._ahead is not None:
            for future in self._ahead.futures:
                future.cancel()
            self._ahead = None

    def _ensure_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix=f"prx-{self.kind}")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def _plan(self, size: int) -> OrderPlan:
        plan = self._plans.get(size)
        if plan is None:
            plan = OrderPlan(self._bucket_N[self._train_N], size, self.seed)
            self._plans[size] = plan
            self._counts["never_trained"] = plan.never_trained
            if plan.never_trained:
                logger.warning(
                    "%s: %d training items sit in buckets with fewer than %d items and are never trained on",
                    self.kind,
                    plan.never_trained,
                    size,
                )
        return plan

    def _fetch(self, index: int, target_hw: tuple[int, int]) -> Fetched:
        """Decode item ``index`` and read its captions; runs in worker threads, counts nothing."""
        known = self._known_bad.get(index)
        if known is not None:
            return BadImage(known, "known bad"), {}
        try:
            image: Decoded | BadImage = decode(self._image_source(index), target_hw, self.limits)
        except BadImage as err:
            return err, {}
        except FileNotFoundError as err:
            return BadImage("missing_file", str(err)), {}
        except OSError as err:
            return BadImage("unreadable", f"{type(err).__name__}: {err}"), {}
        raw = self._raw_captions(index)
        captions = {k: v.strip() for k, v in raw.items() if isinstance(v, str) and v.strip()}
        return image, captions

    def _fetch_many(self, indices: Sequence[int], target_hw: tuple[int, int]) -> list[Fetched]:
        if self._threads <= 1 or len(indices) <= 1:
            return [self._fetch(i, target_hw) for i in indices]
        return list(self._ensure_pool().map(lambda i: self._fetch(i, target_hw), indices))

    def _count(self, index: int, fetched: Fetched) -> LoadedItem | None:
        """Count one load attempt; the item, or None when it is bad (then remembered as bad)."""
        image, captions = fetched
        self._counts["loaded"] += 1
        if isinstance(image, BadImage):
            self._skip(index, image.reason)
            return None
        if image.converted is not None:
            self._counts[f"converted/{image.converted}"] += 1
        if not captions:
            self._skip(index, "no_caption")
            return None
        limit = self.config.max_caption_chars
        for key, text in captions.items():
            if len(text) > limit:
                captions[key] = text[:limit].rstrip()
                self._counts["caption/overlong"] += 1
        self._check_load_ratio()
        return LoadedItem(image_CHW=image.image_CHW, captions=captions, name=self._names[index])

    def _skip(self, index: int, reason: str) -> None:
        self._counts[f"skipped/{reason}"] += 1
        self._counts["load_skipped"] += 1
        if index not in self._known_bad:
            self._known_bad[index] = reason
            self._note_bad(self._names[index], reason)
        self._check_load_ratio()

    def _choose_caption(self, item: LoadedItem, key: str) -> str | None:
        text = item.captions.get(key)
        if text is not None:
            return text
        self._counts["caption/empty"] += 1
        for other in self._fallback:
            if other in item.captions:
                self._counts["caption/fallback"] += 1
                return item.captions[other]
        return None

    def _substitute(
        self, plan: OrderPlan, chunk: int, slot: int, key: str, target: tuple[int, int], used: set[int]
    ) -> tuple[int, LoadedItem, str]:
        """The first usable item of :meth:`OrderPlan.substitutes` not already in this batch."""
        for position in plan.substitutes(chunk, slot):
            index = int(self._train_N[position])
            if index in used:
                continue
            item = self._count(index, self._fetch(index, target))
            if item is None:
                continue
            text = self._choose_caption(item, key)
            if text is None:
                self._skip(index, "no_caption")
                continue
            self._counts["substituted"] += 1
            return index, item, text
        h, w = target
        raise DataQualityError(f"{self.kind}: every item of bucket {h}x{w} is unusable; {self._summary()}")

    def _select_held_out(self) -> tuple[list[int], list[str], set[int]]:
        """The held-out items (decoded once to be sure they work), their captions, and every
        item examined for it (failed candidates are bad data and are not trained on either)."""
        want = self.config.held_out
        if want == 0:
            return [], [], set()
        if want >= len(self._names):
            raise ValueError(
                f"{self.kind}: held_out = {want} but only {len(self._names)} usable items were found; "
                "lower data.held_out"
            )
        hashes = np.fromiter((_name_hash(n) for n in self._names), dtype=np.uint64, count=len(self._names))
        order = np.argsort(hashes, kind="stable")
        chosen: list[int] = []
        captions: list[str] = []
        examined: set[int] = set()
        size = self.config.size
        # Decoded in small groups and dropped at once: a 10k held-out set must not sit in memory.
        batch = max(4 * self._threads, 16)
        for start in range(0, len(order), batch):
            candidates = [int(i) for i in order[start : start + batch]]
            for index, fetched in zip(candidates, self._fetch_many(candidates, (size, size)), strict=True):
                if len(chosen) == want:
                    break
                examined.add(index)
                item = self._count(index, fetched)
                text = self._held_out_caption(item) if item is not None else None
                if item is not None and text is not None:
                    chosen.append(index)
                    captions.append(text)
            if len(chosen) == want:
                break
        if len(chosen) < want:
            raise DataQualityError(f"{self.kind}: only {len(chosen)} of held_out = {want} items decode")
        return chosen, captions, examined

    def _held_out_caption(self, item: LoadedItem) -> str | None:
        # Evaluation prompts are fixed: the heaviest-weighted caption the item has, no random draw.
        for key in self._fallback:
            if key in item.captions:
                return item.captions[key]
        return None

    def _check_held_out(self, start: int, n: int) -> None:
        if start < 0 or n < 0 or start + n > len(self._held_out):
            raise ValueError(
                f"{self.kind}: held-out items {start}..{start + n} requested but only {len(self._held_out)} "
                f"are reserved (data.held_out = {self.config.held_out})"
            )

    def _note_bad(self, name: str, reason: str) -> None:
        if len(self._bad_examples) < _EXAMPLES:
            self._bad_examples.append(f"{name} ({reason})")

    def _summary(self) -> str:
        reasons = {k.removeprefix("skipped/"): v for k, v in sorted(self._counts.items()) if k.startswith("skipped/")}
        by_reason = ", ".join(f"{r} {n}" for r, n in reasons.items()) or "none"
        examples = ", ".join(self._bad_examples) or "none"
        return f"skipped by reason: {by_reason}; first bad items: {examples}"

    def _check_index_ratio(self) -> None:
        self._check_ratio(self._counts["index/excluded"], self._counts["index/files"], "items", "are unusable")

    def _check_load_ratio(self) -> None:
        self._check_ratio(self._counts["load_skipped"], self._counts["loaded"], "items loaded", "were skipped")

    def _check_ratio(self, bad: int, seen: int, what: str, verdict: str) -> None:
        """Stop once more than ``max_skip_ratio`` of at least ``min_seen`` items is bad."""
        if seen >= self.config.min_seen and bad / seen > self.config.max_skip_ratio:
            raise DataQualityError(
                f"{self.kind}: {bad} of {seen} {what} ({_percent(bad / seen)}) {verdict}, more than "
                f"max_skip_ratio = {_percent(self.config.max_skip_ratio)}; {self._summary()}. Fix or remove those "
                "files, or raise data.max_skip_ratio"
            )

    def _make_fingerprint(self, content: Iterable[str]) -> str:
        c = self.config
        digest = hashlib.blake2b(digest_size=12)
        for line in content:
            digest.update(line.encode("utf-8"))
            digest.update(b"\n")
        weights = ",".join(f"{k}={v}" for k, v in sorted(self._weights.items()))
        settings = (
            f"size={c.size}:buckets={c.buckets}:captions={weights}:held_out={c.held_out}:min_side={c.min_side}:"
            f"max_pixels={c.max_pixels}:max_caption_chars={c.max_caption_chars}:seed={self.seed}"
        )
        digest.update(settings.encode("utf-8"))
        return f"{self.kind}:items={len(self._names)}:{digest.hexdigest()}"


def check_against_recipe(source: IndexedSource, recipe: Any) -> None:
    """Fail at build time, with the keys to change, where the recipe cannot use this source.

    Every bucket side must be a multiple of the latent compression × patch size, and the held-out
    split must cover the sample-grid prompts and the evaluation set the recipe asks for.
    """
    latent = recipe.slot_config("latent_space")
    source.check_model_fit(int(latent.spatial_compression) * int(recipe.model.patch_size))
    if not recipe.sampling.prompts:
        source.check_held_out_covers(recipe.sampling.num_prompts, "sampling.num_prompts")
    if recipe.eval.every or recipe.eval.at_end:
        source.check_held_out_covers(recipe.eval.num_samples, "eval.num_samples")
