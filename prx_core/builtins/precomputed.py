"""Data source ``precomputed``: train from the shards ``prx-run precompute`` wrote.

Batches carry latents (or the posterior mean and std, sampled by the trainer each step), the text
states of one caption key per sample, the captions themselves and any precomputed plugin
features, but no pixels. The trainer therefore never needs the autoencoder or the text encoder
for a training step; it builds them lazily, for sampling and evaluation only
(``provides_encodings``).

The sample order is an :class:`prx_core.data.order.OrderPlan` over the stored per-sample buckets:
one bucket per batch, a pure function of (request, seed), so resume is exact and a new seed gives
a new order. The sample table is four numpy columns (``samples.safetensors``); rows, and the
drawn captions, are read lazily from the shards (:class:`prx_core.shards.ShardReader`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    from prx_core.data.order import OrderPlan
    from prx_core.slots import BatchRequest, RawBatch


@dataclass(frozen=True)
class PrecomputedConfig:
    """The ``[data]`` table when ``use = "precomputed"``."""

    #: The output directory of ``prx-run precompute`` (holds ``index.json``).
    path: str = ""
    #: Caption key -> sampling weight, drawn per sample among the stored keys. Unset: "long"
    #: alone when it was stored, else the first stored key.
    caption_weights: dict[str, float] | None = None
    #: Image side for sample grids and generated evaluation images. Unset: the size recorded by
    #: precompute (the data source's ``size``), else the largest bucket's height.
    size: int | None = None
    #: None: the recipe's seed, so changing ``seed`` changes the order too (reference.md §7.6).
    seed: int | None = None
    #: Shard files kept open (memory-mapped) at once by each rank.
    open_shards: int = 32
    #: Read the next micro-batch's rows in a background thread while the current one trains (one
    #: extra micro-batch in memory); the batches are the same either way.
    read_ahead: bool = True

    def __post_init__(self) -> None:
        from prx_core.data.captions import validate_caption_weights

        if not self.path:
            raise ValueError("path must be the output directory of prx-run precompute")
        if self.caption_weights is not None:
            validate_caption_weights(self.caption_weights)
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.open_shards < 1:
            raise ValueError(f"open_shards must be >= 1, got {self.open_shards}")


INFO = PluginInfo(
    name="precomputed",
    summary="Data source: latents, text states and features precomputed by `prx-run precompute`",
    spec="reference.md §3 (data at scale)",
)

#: Recipe tables that must equal the ones the shards were made with.
CHECKED_TABLES = ("latent_space", "text_encoder")


def table_mismatch(recorded: dict[str, Any], current: dict[str, Any], root: Any) -> str | None:
    """Why the recipe's tower tables do not match the recorded ones (None when they match)."""
    for table in CHECKED_TABLES:
        if recorded.get(table) != current.get(table):
            return (
                f"data.path {root} was precomputed with [{table}] {recorded.get(table)}, but this recipe has "
                f"[{table}] {current.get(table)}; precompute again with this recipe, or use the recorded table"
            )
    return None


def _warn_on_version_change(recorded: dict[str, str], recipe: Any, root: Any) -> None:
    """A tower plugin whose version changed since precompute may encode differently: say so loudly."""
    import logging

    for slot in CHECKED_TABLES:
        plugin = recipe.slots[slot].plugin
        before, now = recorded.get(plugin), recipe.active.versions.get(plugin)
        if before is not None and before != now:
            logging.getLogger("prx").warning(
                "data.path %s was precomputed with %s %s, this run has %s %s; if that release changed its "
                "encoding, precompute again",
                root,
                plugin,
                before,
                plugin,
                now,
            )


class PrecomputedSource:
    """:class:`prx_core.slots.DataSource` and :class:`prx_core.slots.EncodingsSource` over shards."""

    provides_encodings = True

    def __init__(self, config: PrecomputedConfig, run: Any) -> None:
        import hashlib
        from pathlib import Path

        import numpy as np

        from prx_core.config import RecipeError
        from prx_core.data.captions import validate_caption_weights
        from prx_core.shards import INDEX_FILE, ShardReader, read_index, read_samples

        root = Path(config.path).expanduser()
        index = read_index(root)
        problem = table_mismatch(index, run.recipe.resolved(), root)
        if problem:
            raise RecipeError(problem)
        self.root = root
        self.index = index
        _warn_on_version_change(index.get("plugin_versions", {}), run.recipe, root)
        self.seed = config.seed if config.seed is not None else int(run.recipe.seed)
        self.caption_keys: tuple[str, ...] = tuple(index["caption_keys"])
        if config.caption_weights is not None:
            weights = dict(config.caption_weights)
        else:
            weights = {"long" if "long" in self.caption_keys else self.caption_keys[0]: 1.0}
        try:
            self.caption_weights = validate_caption_weights(weights, available=self.caption_keys)
        except ValueError as err:
            raise RecipeError(f"data.caption_weights: {err} (the keys {root} stores)") from None
        #: Columns ``ids``, ``shard``, ``row``, ``caption_keys`` (numpy int64, one row per sample).
        self.samples = read_samples(root, index)
        if not len(self.samples["ids"]):
            raise RecipeError(f"data.path {root} holds no samples")
        self.shards: list[dict[str, Any]] = index["shards"]
        buckets = sorted({(int(s["bucket"][0]), int(s["bucket"][1])) for s in self.shards})
        bucket_number = {b: i for i, b in enumerate(buckets)}
        self.buckets = buckets
        shard_bucket = np.array([bucket_number[(int(s["bucket"][0]), int(s["bucket"][1]))] for s in self.shards])
        self.bucket_ids = shard_bucket[self.samples["shard"]]
        self._plans: dict[int, OrderPlan] = {}
        self.mode: str = index["mode"]
        self.precomputed_features: dict[str, tuple[int, ...]] = {
            k: tuple(int(d) for d in v) for k, v in index.get("features", {}).items()
        }
        self.text_shape: tuple[int, int] = (int(index["text_shape"][0]), int(index["text_shape"][1]))
        self.size = config.size or index.get("size") or max(h for h, _ in buckets)
        self.reader = ShardReader(root / "shards", max_open=config.open_shards)
        self._check_held_out_covers(run.recipe)
        digest = hashlib.sha256((root / INDEX_FILE).read_bytes()).hexdigest()[:16]
        captions = ",".join(f"{k}={v}" for k, v in sorted(self.caption_weights.items()))
        self.fingerprint = f"precomputed:{index['fingerprint']}:index={digest}:captions={captions}"
        self._held_out: dict[str, torch.Tensor] | None = None
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None
        self.device = run.device
        self.read_ahead = config.read_ahead
        self._worker: ThreadPoolExecutor | None = None
        self._ahead: tuple[BatchRequest, Future[RawBatch]] | None = None
        #: Micro-batches served from the read-ahead (for tests).
        self.read_ahead_hits = 0

    def _check_held_out_covers(self, recipe: Any) -> None:
        """Fail at build time when sample grids or evaluation ask for more held-out items than stored."""
        from prx_core.config import RecipeError

        count = len(self.index["held_out"]["captions"])
        needs = []
        if not recipe.sampling.prompts:
            needs.append(("sampling.num_prompts", recipe.sampling.num_prompts))
        if recipe.eval.every or recipe.eval.at_end:
            needs.append(("eval.num_samples", recipe.eval.num_samples))
        for key, wanted in needs:
            if wanted > count:
                raise RecipeError(
                    f"{key} is {wanted}, but {self.root} stores {count} held-out items; lower it, or precompute "
                    "with a larger held-out set"
                )

    # ------------------------------------------------------------------ training batches

    def _gather(
        self,
        picks: list[tuple[int, int]],
        key: str,
        slots: list[int] | None = None,
        out: torch.Tensor | None = None,
        size: int | None = None,
    ) -> torch.Tensor:
        """Rows ``(shard number, row)`` of tensor ``key`` written to ``out[slots]``; without ``out``
        a new tensor of ``size`` rows (default: one per pick, in order). Each row is copied once
        out of its shard's read block."""
        import torch

        slots = list(range(len(picks))) if slots is None else slots
        by_shard: dict[int, dict[int, list[int]]] = {}
        for slot, (shard, row) in zip(slots, picks, strict=True):
            by_shard.setdefault(shard, {}).setdefault(row, []).append(slot)
        for shard, wanted in sorted(by_shard.items()):
            for row, view in self.reader.row_views(self.shards[shard]["file"], key, list(wanted)):
                if out is None:
                    out = torch.empty((size or len(picks), *view.shape), dtype=view.dtype)
                for slot in wanted[row]:
                    out[slot].copy_(view)
        if out is None:
            raise ValueError(f"no rows requested of '{key}'")
        return out

    def _pick_keys(self, positions: list[int], picks: list[tuple[int, int]], first: int) -> list[str]:
        """One caption key per sample, by weight among the keys that sample has."""
        from prx_core.data.captions import pick_caption_keys
        from prx_core.seeding import generator_for

        generator = generator_for(self.seed, "captions", first)
        masks = [int(self.samples["caption_keys"][p]) for p in positions]
        bits = {key: 1 << i for i, key in enumerate(self.caption_keys)}
        weighted = sum(bits[k] for k in self.caption_weights)
        if all(mask & weighted == weighted for mask in masks):
            return pick_caption_keys(self.caption_weights, len(positions), generator)
        keys = []
        for position, pick, mask in zip(positions, picks, masks, strict=True):
            weights = {k: w for k, w in self.caption_weights.items() if mask & bits[k]}
            if sum(weights.values()) <= 0:
                (name,) = self.reader.strings(self.shards[pick[0]]["file"], "names", [pick[1]])
                has = sorted(k for k, bit in bits.items() if mask & bit)
                raise ValueError(
                    f"sample {int(self.samples['ids'][position])} ({name}) has none of the weighted caption keys "
                    f"{sorted(self.caption_weights)} (it has {has})"
                )
            keys.extend(pick_caption_keys(weights, 1, generator))
        return keys

    def _captions(self, picks: list[tuple[int, int]], keys: list[str]) -> list[str]:
        """The drawn caption of each sample, read from its shard (only this batch's strings)."""
        return [
            self.reader.strings(self.shards[shard]["file"], f"captions.{key}", [row])[0]
            for (shard, row), key in zip(picks, keys, strict=True)
        ]

    def batch(self, request: BatchRequest) -> RawBatch:
        """The rows of ``request``; with ``read_ahead`` they were read while the previous step ran.

        Every read goes through one worker thread (a stale read-ahead finishes before the next
        read starts), so the shard reader and its open files are never used by two threads.
        """
        if not self.read_ahead:
            return self._read(request)
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor

            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prx-precomputed")
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == request:
            self.read_ahead_hits += 1
            future = ahead[1]
        else:
            future = self._worker.submit(self._read, request)
        raw = future.result()
        following = request.following()
        self._ahead = (following, self._worker.submit(self._read, following))
        return raw

    def _read(self, request: BatchRequest) -> RawBatch:
        from prx_core.data.order import OrderPlan
        from prx_core.slots import RawBatch

        plan = self._plans.get(request.size)
        if plan is None:  # one plan per micro-batch size, built once (a million samples: ~0.1 s)
            plan = self._plans[request.size] = OrderPlan(self.bucket_ids, request.size, self.seed)
        positions = plan.for_request(request)
        picks = [(int(self.samples["shard"][p]), int(self.samples["row"][p])) for p in positions]
        keys = self._pick_keys(positions, picks, request.first_sample())
        latents = self._gather(picks, "latents")
        std = self._gather(picks, "latent_std") if self.mode == "sample" else None
        # Every drawn key's rows go straight into one [B, L, D] batch (and its mask).
        text_BLD: torch.Tensor | None = None
        mask_BL: torch.Tensor | None = None
        for key in sorted(set(keys)):
            slots = [i for i, k in enumerate(keys) if k == key]
            sub = [picks[i] for i in slots]
            text_BLD = self._gather(sub, f"text.{key}", slots, text_BLD, size=len(picks))
            mask_BL = self._gather(sub, f"mask.{key}", slots, mask_BL, size=len(picks))
        if text_BLD is None or mask_BL is None:
            raise ValueError("a batch of no samples was requested")
        shard_features = [set(self.shards[p[0]].get("features", [])) for p in picks]
        common = set.intersection(*shard_features) if shard_features else set()
        features = {name: self._gather(picks, f"features.{name}") for name in sorted(common)}
        return RawBatch(
            images_BCHW=None,
            captions=self._captions(picks, keys),
            latents_BCHW=latents,
            latent_std_BCHW=std,
            text_BLD=text_BLD,
            mask_BL=mask_BL,
            features=features,
            sample_ids=[int(self.samples["ids"][p]) for p in positions],
        )

    # ------------------------------------------------------------------ held-out set and empty prompt

    def _held(self) -> dict[str, torch.Tensor]:
        if self._held_out is None:
            from prx_core.shards import HELD_OUT_FILE, read_tensors

            self._held_out = read_tensors(self.root / HELD_OUT_FILE)
        return self._held_out

    def held_out_captions(self, n: int) -> list[str]:
        captions: list[str] = self.index["held_out"]["captions"]
        return captions[:n]

    def held_out(self, start: int, n: int) -> RawBatch:
        from prx_core.slots import RawBatch

        captions: list[str] = self.index["held_out"]["captions"]
        if start < 0 or start + n > len(captions):
            raise ValueError(
                f"held-out items {start}..{start + n - 1} requested, but {self.root} stores {len(captions)}; "
                "lower eval.num_samples (or precompute a larger held-out set)"
            )
        import torch

        held = self._held()
        items = range(start, start + n)
        shapes = {tuple(held[f"images.{i}"].shape) for i in items}
        if len(shapes) > 1:
            raise ValueError(
                f"held-out items {start}..{start + n - 1} have different sizes {sorted(shapes)}; ask for one"
            )
        return RawBatch(
            images_BCHW=torch.stack([held[f"images.{i}"] for i in items]).float() / 255.0,
            captions=captions[start : start + n],
            latents_BCHW=torch.stack([held[f"latents.{i}"] for i in items]),
            text_BLD=torch.stack([held[f"text.{i}"] for i in items]),
            mask_BL=torch.stack([held[f"mask.{i}"] for i in items]),
            sample_ids=[int(i) for i in self.index["held_out"]["ids"][start : start + n]],
        )

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._empty is None:
            from prx_core.shards import EMPTY_FILE, read_tensors

            stored = read_tensors(self.root / EMPTY_FILE)
            self._empty = (stored["text"].to(self.device), stored["mask"].to(self.device))
        return self._empty


def _build(config: PrecomputedConfig, run: Any) -> PrecomputedSource:
    return PrecomputedSource(config, run)


@hookimpl
def prx_register_data_sources(registry: Any) -> None:
    registry.register("precomputed", _build, PrecomputedConfig)
