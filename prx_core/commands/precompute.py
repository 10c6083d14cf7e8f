"""``prx-run precompute``: encode a data set once into shards, then train from them.

    prx-run precompute RECIPE --out DIR [--set KEY=VALUE ...] [--mode sample|mode]
        [--features/--no-features] [--dtype float16|bfloat16|float32] [--shard-size N] [--batch-size N]

It builds only what encoding needs: the precision policy, the recipe's data source (which must be
an indexed source, such as ``image_folder`` or ``webdataset``), the latent space, the text encoder
and, with ``--features``, the plugins implementing ``prx_precompute_features`` (REPA's teacher
targets). Under ``torchrun`` the training indices are dealt round-robin over the processes.

Each process encodes its items bucket by bucket and writes one safetensors shard per
``--shard-size`` items of a bucket, atomically, recording it in its progress log; rerunning the
same command after a kill skips every recorded shard. Rank 0 also stores the held-out set (latents,
the states of one caption key, the uint8 images) and the empty prompt, then the sample table and
``index.json``.
Train from the result with ``[data] use = "precomputed"`` and ``path = DIR``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prx_core.config import RecipeError

if TYPE_CHECKING:
    import torch

    from prx_core.context import RunContext
    from prx_core.recipe import Recipe

logger = logging.getLogger("prx")

#: What an indexed data source must offer (``prx_core.data.indexed.IndexedSource``).
INDEXED_API = ("caption_keys", "train_indices", "bucket_of", "load", "held_out_indices", "stats")
DTYPES = ("float16", "bfloat16", "float32")
#: The settings a resumed run must share with the run that started the directory.
RESUME_KEYS = (
    "format_version",
    "fingerprint",
    "world_size",
    "shard_size",
    "mode",
    "dtype",
    "feature_plugins",
    "feature_configs",
    "latent_space",
    "text_encoder",
)


class PrecomputeError(RuntimeError):
    """Precompute cannot run or continue; the message says why and what to do."""


@dataclass(frozen=True)
class Options:
    out: Path
    #: "sample": store the posterior mean and std (sampled per step); "mode": the mean only.
    #: None: "sample" when the latent space has a posterior and samples it, else "mode".
    mode: str | None = None
    features: bool = True
    dtype: str = "bfloat16"
    shard_size: int = 256
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.mode not in (None, "sample", "mode"):
            raise ValueError(f"--mode must be 'sample' or 'mode', got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("--shard-size and --batch-size must be >= 1")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx-run precompute",
        description="Encode a recipe's data (latents, caption states, plugin features) into shards.",
    )
    parser.add_argument("recipe", type=Path, help="recipe TOML file (its data, latent_space and text_encoder)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--mode",
        choices=("sample", "mode"),
        help="'sample': store the posterior mean and std, a fresh latent is drawn each step; 'mode': the mean "
        "only (default: 'sample' when the latent space samples its posterior)",
    )
    parser.add_argument(
        "--features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also store plugin targets (prx_precompute_features, e.g. REPA's teacher tokens)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="storage dtype of float tensors")
    parser.add_argument("--shard-size", type=int, default=256, help="items per shard (one bucket per shard)")
    parser.add_argument("--batch-size", type=int, default=32, help="items encoded per forward pass")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from prx_core.cli import _setup_logging

    _setup_logging(args.quiet)
    from prx_core.recipe import load

    try:
        recipe = load(args.recipe, args.overrides)
        options = Options(args.out, args.mode, args.features, args.dtype, args.shard_size, args.batch_size)
    except (RecipeError, ValueError) as err:
        print(f"prx-run precompute: {err}", file=sys.stderr)
        return 2

    from prx_core.data.indexed import DataQualityError
    from prx_core.distributed import shutdown
    from prx_core.shards import ShardError

    finished = False
    try:
        index = precompute(recipe, options)
        finished = True
    except (PrecomputeError, RecipeError, ShardError, DataQualityError) as err:
        print(f"prx-run precompute: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown(finished)
    if index is not None:
        print(
            f"{index['samples']['count']} samples in {len(index['shards'])} shards "
            f"({len(index['skipped_ids'])} unreadable item(s) skipped), {index['held_out']['count']} held out, "
            f"written to {options.out}"
        )
        print(f'train from it: prx-run {options.out / "train.toml"}  (or [data] use = "precomputed", path = ...)')
    return 0


# --------------------------------------------------------------------------- building


def check_indexed(data: Any, name: str) -> None:
    missing = [attr for attr in INDEXED_API if not hasattr(data, attr)]
    if missing:
        raise PrecomputeError(
            f"data source '{name}' cannot be precomputed: it is not an indexed source (it lacks "
            f"{', '.join(missing)}); precompute reads indexed sources such as image_folder or webdataset"
        )


def resolve_mode(requested: str | None, latent_space: Any, latent_config: Any) -> str:
    from prx_core.slots import DistributionLatentSpace

    has_posterior = isinstance(latent_space, DistributionLatentSpace)
    if requested is None:
        return "sample" if has_posterior and getattr(latent_config, "sample_posterior", True) else "mode"
    if requested == "sample" and not has_posterior:
        logger.info("the latent space is deterministic (no encode_distribution): storing its encoding (mode)")
        return "mode"
    if requested == "sample" and not getattr(latent_config, "sample_posterior", True):
        logger.warning(
            "--mode sample: training will sample the posterior although [latent_space] sample_posterior = false"
        )
    return requested


def storage_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def feature_plugins(recipe: Recipe) -> list[str]:
    return sorted(impl.plugin_name for impl in recipe.active.manager.hook.prx_precompute_features.get_hookimpls())


def compute_features(run: RunContext, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every feature plugin's targets for one batch, keys checked unique."""
    merged: dict[str, torch.Tensor] = {}
    for contribution in run.recipe.active.manager.hook.prx_precompute_features(run=run, images_BCHW=images_BCHW):
        for key, value in (contribution or {}).items():
            if key in merged:
                raise PrecomputeError(f"two plugins return a precomputed feature named '{key}'")
            if value.shape[0] != images_BCHW.shape[0]:
                raise PrecomputeError(
                    f"feature '{key}' has {value.shape[0]} rows for a batch of {images_BCHW.shape[0]} images"
                )
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- encoding


class Encoder:
    """Encodes batches of loaded items: latents, every caption key's states, plugin features."""

    def __init__(self, run: RunContext, mode: str, dtype: torch.dtype, caption_keys: Sequence[str], features: bool):
        self.run = run
        self.mode = mode
        self.dtype = dtype
        self.caption_keys = tuple(caption_keys)
        self.features = features

    def latents(self, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
        space = self.run.require("latent_space")
        if self.mode == "sample":
            mean_BCHW, std_BCHW = space.encode_distribution(images_BCHW)
            return {"latents": mean_BCHW.to(self.dtype), "latent_std": std_BCHW.to(self.dtype)}
        return {"latents": space.encode(images_BCHW, None).to(self.dtype)}

    def text(self, captions: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """States and masks of ``captions``; a missing caption (None) gets zero states and an all-False mask."""
        import torch

        encoder = self.run.require("text_encoder")
        present = [i for i, c in enumerate(captions) if c is not None]
        length, dim = int(encoder.max_length), int(encoder.dim)
        states_BLD = torch.zeros(len(captions), length, dim, dtype=self.dtype)
        mask_BL = torch.zeros(len(captions), length, dtype=torch.bool)
        if present:
            states, mask = encoder.encode([captions[i] for i in present])
            states_BLD[present] = states.to("cpu", self.dtype)
            mask_BL[present] = mask.to("cpu").bool()
        return states_BLD, mask_BL

    def batch(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        import torch

        from prx_core.transfer import images_to_float, to_device

        # uint8 pixels cross to the device in one copy and become [0, 1] floats there.
        images_BCHW = images_to_float(to_device(torch.stack([item.image_CHW for item in items]), self.run.device))
        out = {k: v.cpu() for k, v in self.latents(images_BCHW).items()}
        for key in self.caption_keys:
            out[f"text.{key}"], out[f"mask.{key}"] = self.text([item.captions.get(key) for item in items])
        if self.features:
            for name, value in compute_features(self.run, images_BCHW).items():
                out[f"features.{name}"] = value.detach().to("cpu", self.dtype)
        return out


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    import torch

    keys = set(parts[0])
    for part in parts[1:]:
        if set(part) != keys:
            raise PrecomputeError(f"batches of one shard produced different tensors: {sorted(keys ^ set(part))}")
    return {k: torch.cat([p[k] for p in parts]) for k in sorted(keys)}


def shard_plan(
    indices: Sequence[int], bucket_of: Any, rank: int, world_size: int, shard_size: int
) -> list[tuple[str, tuple[int, int], list[int]]]:
    """This rank's shards: (file name, bucket, source indices), a pure function of its arguments.

    Indices are dealt round-robin over ranks, grouped by bucket (in sorted bucket order, items in
    index order) and cut into ``shard_size`` pieces, so a rerun recreates exactly the same shards.
    """
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in list(indices)[rank::world_size]:
        height, width = bucket_of(index)
        by_bucket.setdefault((int(height), int(width)), []).append(int(index))
    plan = []
    for (height, width), members in sorted(by_bucket.items()):
        for k, start in enumerate(range(0, len(members), shard_size)):
            name = f"r{rank:03d}-{height}x{width}-{k:05d}.safetensors"
            plan.append((name, (height, width), members[start : start + shard_size]))
    return plan


# --------------------------------------------------------------------------- the run


def _settings(
    recipe: Recipe, data: Any, world_size: int, mode: str, options: Options, plugins: list[str]
) -> dict[str, Any]:
    from prx_core.shards import FORMAT_VERSION

    resolved = recipe.resolved()
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": str(data.fingerprint),
        "world_size": world_size,
        "shard_size": options.shard_size,
        "mode": mode,
        "dtype": options.dtype,
        "feature_plugins": plugins,
        # What the features were computed with (e.g. REPA's teacher and its weights).
        "feature_configs": {name: resolved.get("plugins", {}).get(name, {}) for name in plugins},
        "latent_space": resolved["latent_space"],
        "text_encoder": resolved["text_encoder"],
        "caption_keys": list(data.caption_keys),
    }


def _check_resume(out: Path, settings: Mapping[str, Any]) -> bool:
    """True when ``out`` was started by a run with the same settings; raises when they differ."""
    from prx_core.shards import SETTINGS_FILE, read_json

    path = out / SETTINGS_FILE
    if not path.is_file():
        return False
    recorded = read_json(path)
    changed = [k for k in RESUME_KEYS if recorded.get(k) != settings.get(k)]
    if changed:
        details = "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise PrecomputeError(
            f"{out} holds a precompute with other settings ({details}); rerun with the original settings to "
            "resume it, or choose a new --out"
        )
    return True


def _write_held_out(run: RunContext, encoder: Encoder, out: Path) -> None:
    """The source's held-out set as its ``held_out`` gives it (the images evaluation compares
    against, with the captions it chose), item by item: mode latents, caption states, uint8 images."""
    import json

    import torch

    from prx_core.shards import HELD_OUT_FILE, write_tensors_atomic

    data = run.require("data")
    space = run.require("latent_space")
    ids = [int(i) for i in data.held_out_indices()]
    if not ids:
        raise PrecomputeError("the data source holds no held-out item; evaluation and sample grids need some")
    tensors: dict[str, torch.Tensor] = {}
    captions: list[str] = []
    for i in range(len(ids)):
        raw = data.held_out(i, 1)
        images_1CHW = raw.images_BCHW
        tensors[f"latents.{i}"] = space.encode(images_1CHW.to(run.device), None)[0].to("cpu", encoder.dtype)
        states, mask = encoder.text(raw.captions)
        tensors[f"text.{i}"], tensors[f"mask.{i}"] = states[0], mask[0]
        tensors[f"images.{i}"] = (images_1CHW[0].float().clamp(0, 1) * 255).round().to(torch.uint8)
        captions.append(raw.captions[0])
    write_tensors_atomic(out / HELD_OUT_FILE, tensors, {"captions": json.dumps(captions), "ids": json.dumps(ids)})


def _held_out_summary(out: Path) -> dict[str, Any]:
    import json

    from safetensors import safe_open

    from prx_core.shards import HELD_OUT_FILE

    with safe_open(str(out / HELD_OUT_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    captions = json.loads(metadata["captions"])
    return {
        "count": len(captions),
        "captions": captions,
        "ids": json.loads(metadata["ids"]),
    }


def precompute(recipe: Recipe, options: Options) -> dict[str, Any] | None:
    """Run (or resume) a precompute; returns the index on rank 0, None on other ranks."""
    import torch
    from tqdm import tqdm

    from prx_core.context import RunContext
    from prx_core.distributed import barrier, init_from_env
    from prx_core.shards import (
        EMPTY_FILE,
        HELD_OUT_FILE,
        PROGRESS_DIR,
        SETTINGS_FILE,
        SHARD_DIR,
        ProgressLog,
        write_json_atomic,
        write_tensors_atomic,
    )
    from prx_core.towers import build_slot
    from prx_core.trainer import resolve_device

    wanted = resolve_device(recipe.train.device)
    dist = init_from_env(wanted.type)
    device = torch.device("cuda", dist.local_rank) if wanted.type == "cuda" else wanted
    if not dist.is_main:
        logging.getLogger("prx").setLevel(logging.WARNING)
    out = options.out
    run = RunContext(recipe=recipe, device=device, run_dir=out, rank=dist.rank, world_size=dist.world_size)
    run.precision = build_slot(recipe, run, "precision")
    run.data = build_slot(recipe, run, "data")
    data: Any = run.data
    check_indexed(data, recipe.slots["data"].use)
    # Taken before any item is decoded, so a resumed run records the same counts.
    index_time_stats = {k: float(v) for k, v in data.stats().items()}
    run.latent_space = build_slot(recipe, run, "latent_space")
    run.text_encoder = build_slot(recipe, run, "text_encoder")
    mode = resolve_mode(options.mode, run.latent_space, recipe.slot_config("latent_space"))
    plugins = feature_plugins(recipe) if options.features else []
    settings = _settings(recipe, data, dist.world_size, mode, options, plugins)
    resuming = _check_resume(out, settings)
    barrier(dist)  # every rank read the old settings before rank 0 writes new ones
    if dist.is_main and not resuming:
        write_json_atomic(out / SETTINGS_FILE, settings)
    dtype = storage_dtype(options.dtype)
    encoder = Encoder(run, mode, dtype, data.caption_keys, features=bool(plugins))

    plan = shard_plan(data.train_indices(), data.bucket_of, dist.rank, dist.world_size, options.shard_size)
    log = ProgressLog(out / PROGRESS_DIR / f"rank{dist.rank:03d}.jsonl")
    shard_dir = out / SHARD_DIR
    done = {str(r["shard"]) for r in log.records() if not r.get("ids") or (shard_dir / str(r["shard"])).is_file()}
    todo = [entry for entry in plan if entry[0] not in done]
    logger.info(
        "precompute: rank %d encodes %d shard(s) (%d already done) in mode '%s' as %s%s",
        dist.rank,
        len(todo),
        len(plan) - len(todo),
        mode,
        options.dtype,
        f", features from {', '.join(plugins)}" if plugins else "",
    )
    total = sum(len(members) for _, _, members in plan)
    already = total - sum(len(members) for _, _, members in todo)
    show = dist.is_main and sys.stderr.isatty()
    with torch.no_grad(), tqdm(total=total, initial=already, unit="img", disable=not show, desc="precompute") as bar:
        for name, bucket, members in todo:
            record, tensors = _encode_shard(data, encoder, name, bucket, members, options.batch_size, bar.update)
            if tensors is not None:
                write_tensors_atomic(shard_dir / name, tensors, {"bucket": f"{bucket[0]}x{bucket[1]}"})
            log.append(record)  # only once the shard is durable
        if dist.is_main:
            if not (out / HELD_OUT_FILE).is_file():
                _write_held_out(run, encoder, out)
            if not (out / EMPTY_FILE).is_file():
                states, mask = run.require("text_encoder").empty()
                empty = {"text": states.to("cpu", dtype), "mask": mask.to("cpu").bool()}
                write_tensors_atomic(out / EMPTY_FILE, empty)
    barrier(dist)  # every rank's shards are committed before rank 0 lists them
    if not dist.is_main:
        return None
    return _write_index(recipe, data, options, settings, index_time_stats)


def _prefetched(data: Any, chunks: Sequence[Sequence[int]]) -> Iterator[list[Any]]:
    """The loaded items of each chunk, the next chunk decoding in a thread while this one encodes.

    One loader thread calls the source (its bad-data counters are not meant for concurrent
    callers); a source with ``load_many`` decodes a chunk in parallel itself.
    """
    from concurrent.futures import ThreadPoolExecutor

    load_many = getattr(data, "load_many", None)

    def load(chunk: Sequence[int]) -> list[Any]:
        return list(load_many(chunk)) if load_many is not None else [data.load(i) for i in chunk]

    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prx-precompute-load") as pool:
        pending = pool.submit(load, chunks[0])
        for k in range(len(chunks)):
            loaded = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(load, chunks[k + 1])
            yield loaded


def _encode_shard(
    data: Any,
    encoder: Encoder,
    name: str,
    bucket: tuple[int, int],
    members: list[int],
    batch_size: int,
    advance: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """One shard's progress record and tensors (None when no item of it could be read)."""
    import torch

    from prx_core.shards import key_mask, pack_strings

    parts: list[dict[str, torch.Tensor]] = []
    record: dict[str, Any] = {
        "shard": name,
        "bucket": list(bucket),
        "ids": [],
        "key_masks": [],
        "skipped": [],
        "features": {},
    }
    names: list[str] = []
    captions: list[dict[str, str]] = []
    chunks = [members[start : start + batch_size] for start in range(0, len(members), batch_size)]
    for chunk, loaded in zip(chunks, _prefetched(data, chunks), strict=True):
        items = []
        for item_index, item in zip(chunk, loaded, strict=True):
            if item is None:  # unreadable at decode time; the source counts it
                record["skipped"].append(item_index)
                continue
            if tuple(item.image_CHW.shape[-2:]) != bucket:
                raise PrecomputeError(
                    f"item {item_index} ({item.name}) loads at {tuple(item.image_CHW.shape[-2:])}, "
                    f"but the data source puts it in bucket {bucket}"
                )
            items.append(item)
            present = {k: str(v) for k, v in sorted(item.captions.items()) if v is not None}
            record["ids"].append(item_index)
            record["key_masks"].append(key_mask(present, encoder.caption_keys))
            names.append(str(item.name))
            captions.append(present)
        if items:
            parts.append(encoder.batch(items))
        advance(len(chunk))
    if not parts:
        return record, None
    tensors = _cat(parts)
    tensors["ids"] = torch.tensor(record["ids"], dtype=torch.int64)
    # The strings travel with their rows (not in index.json), so no rank ever loads all of them.
    tensors["names.utf8"], tensors["names.offsets"] = pack_strings(names)
    for key in encoder.caption_keys:
        texts = [present.get(key, "") for present in captions]
        tensors[f"captions.{key}.utf8"], tensors[f"captions.{key}.offsets"] = pack_strings(texts)
    record["features"] = {
        k.removeprefix("features."): list(v.shape[1:]) for k, v in tensors.items() if k.startswith("features.")
    }
    return record, tensors


def _write_index(
    recipe: Recipe, data: Any, options: Options, settings: Mapping[str, Any], data_stats: Mapping[str, float]
) -> dict[str, Any]:
    """Rank 0, after every rank committed its shards: ``index.json`` from all progress logs."""
    from safetensors.torch import load_file

    from prx_core import __version__
    from prx_core.shards import (
        EMPTY_FILE,
        INDEX_FILE,
        PROGRESS_DIR,
        SAMPLES_FILE,
        SHARD_DIR,
        ProgressLog,
        assemble_index,
        write_json_atomic,
        write_tensors_atomic,
    )

    out = options.out
    world_size = int(settings["world_size"])
    planned = {
        name
        for rank in range(world_size)
        for name, _, _ in shard_plan(data.train_indices(), data.bucket_of, rank, world_size, options.shard_size)
    }
    logged = [r for path in sorted((out / PROGRESS_DIR).glob("rank*.jsonl")) for r in ProgressLog(path).records()]
    records = _latest(logged, planned)
    features: dict[str, list[int]] = {}
    for record in records:
        for key, shape in record.get("features", {}).items():
            if features.setdefault(key, shape) != shape:
                raise PrecomputeError(
                    f"feature '{key}' has per-sample shape {shape} in one shard, {features[key]} in another"
                )
    empty = load_file(str(out / EMPTY_FILE))
    versions = recipe.active.versions_table()
    used = {recipe.slots[s].plugin for s in ("latent_space", "text_encoder", "data")} | set(settings["feature_plugins"])
    header = {
        **settings,
        "size": getattr(recipe.slot_config("data"), "size", None),
        "text_shape": list(empty["text"].shape[1:]),
        "features": features,
        "held_out": _held_out_summary(out),
        "plugin_versions": {"prx_core": __version__, **{k: v for k, v in versions.items() if k in used}},
        "data_stats": dict(data_stats),
    }
    index, table = assemble_index(header, records)
    for shard in index["shards"]:
        if not (out / SHARD_DIR / shard["file"]).is_file():
            raise PrecomputeError(f"shard {out / SHARD_DIR / shard['file']} is missing; rerun the same command")
    write_tensors_atomic(out / SAMPLES_FILE, table)  # before index.json, which marks the directory complete
    write_json_atomic(out / INDEX_FILE, index)
    _write_training_recipe(recipe, out, index["caption_keys"])
    logger.info(
        "precompute: wrote %s (%d samples, %d shards)",
        out / INDEX_FILE,
        index["samples"]["count"],
        len(index["shards"]),
    )
    return index


def _write_training_recipe(recipe: Recipe, out: Path, caption_keys: Sequence[str]) -> Path:
    """``DIR/train.toml``: the resolved recipe with ``[data]`` switched to these shards.

    Resolved, so its ``[latent_space]`` and ``[text_encoder]`` tables are exactly the recorded
    ones; the source's caption weights and seed carry over where they apply.
    """
    from prx_core.recipe import dump_toml
    from prx_core.rundir import write_atomic

    resolved = recipe.resolved()
    source = recipe.slot_config("data")
    data: dict[str, Any] = {"use": "precomputed", "path": str(out.resolve())}
    weights = getattr(source, "caption_weights", None)
    if weights and set(weights) <= set(caption_keys):
        data["caption_weights"] = dict(weights)
    if getattr(source, "seed", None) is not None:
        data["seed"] = int(source.seed)
    resolved["data"] = data
    header = f"Recipe '{recipe.name}' training from the shards prx-run precompute wrote here: prx-run {out}/train.toml"
    path = out / "train.toml"
    write_atomic(path, dump_toml(resolved, header=header))
    return path


def _latest(records: list[dict[str, Any]], planned: set[str]) -> list[dict[str, Any]]:
    """One record per planned shard (the last one written, if a shard was redone after a kill)."""
    by_name: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["shard"] in planned:
            by_name[str(record["shard"])] = record
    missing = planned - set(by_name)
    if missing:
        raise PrecomputeError(
            f"{len(missing)} shard(s) were never committed (e.g. {sorted(missing)[0]}); rerun the same command"
        )
    return [by_name[name] for name in sorted(by_name)]
