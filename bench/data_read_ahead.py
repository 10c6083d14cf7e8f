"""Does reading the next micro-batch in the background hide the data source behind the step?

    python bench/data_read_ahead.py                          # 160 JPEGs of 640-1280 px, batch 16, 150 ms steps
    python bench/data_read_ahead.py --step-ms 60 --batch 32  # a data-bound case
    python bench/data_read_ahead.py --source precomputed     # shards at PRX sizes (T5-Gemma text states)

``image_folder`` (the default): a folder of photo-sized JPEGs with a caption sidecar, written once
into ``--data``. ``precomputed``: a ``prx-run precompute`` directory at the PRX-1.2B 256-px sizes
(latent mean and std 16×32×32 and text states 256×2304, bf16, with masks: 1.2 MB per sample),
written straight through :mod:`prx_core.shards`. The source is built twice, with ``read_ahead``
on and off, and each runs a training-like loop: ``source.batch(request)``, then a stand-in for
the model step that keeps the host thread blocked for ``--step-ms`` (``time.sleep``: on a GPU
the host waits for the device like this; a CPU-bound stand-in would instead compete with the
reading threads for cores, which is a different question). The two sides alternate in blocks of
``--block`` steps; each block's time includes waiting for the read-ahead it left running, so no
reading is done for free in the other side's block.

It prints, per side, the median wall time per step and the time per step spent inside
``batch()`` (the main thread waiting for data), and the speed-up of read-ahead. The ideal is a
step of max(step, read) instead of step + read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from _common import header
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_photos(root: Path, count: int, seed: int = 0) -> None:
    """``count`` JPEGs of 640-1280 px on the long side at bucket-range aspects, with captions."""
    if (root / "captions.jsonl").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    aspects = (0.5, 0.75, 1.0, 4 / 3, 2.0)
    lines = []
    for i in range(count):
        long_side = int(rng.integers(640, 1281))
        aspect = aspects[i % len(aspects)]
        width, height = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        # Smooth colour fields plus noise: JPEGs of photo-like size (not trivially compressible).
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        base_HW3 = np.stack([np.sin(xx / (40 + 7 * c) + i) * np.cos(yy / (55 + 5 * c)) for c in range(3)], axis=-1)
        pixels_HW3 = (base_HW3 * 80 + 128 + rng.normal(0, 12, size=(height, width, 3))).clip(0, 255)
        name = f"{i:05d}.jpg"
        Image.fromarray(pixels_HW3.astype(np.uint8)).save(root / name, quality=90)
        lines.append(json.dumps({"file": name, "caption": f"photo {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_precomputed(root: Path, count: int, recipe_tables: dict[str, Any]) -> None:
    """A ``prx-run precompute`` directory of ``count`` random samples at PRX-1.2B's 256-px sizes."""
    import torch

    from prx_core.shards import (
        EMPTY_FILE,
        INDEX_FILE,
        SAMPLES_FILE,
        SHARD_DIR,
        assemble_index,
        pack_strings,
        write_json_atomic,
        write_tensors_atomic,
    )

    if (root / INDEX_FILE).is_file():
        return
    generator = torch.Generator().manual_seed(0)
    records, shard_size = [], 64
    for k, start in enumerate(range(0, count, shard_size)):
        ids = list(range(start, min(start + shard_size, count)))
        rows = len(ids)
        tensors = {
            "latents": torch.randn(rows, 16, 32, 32, generator=generator).bfloat16(),
            "latent_std": torch.rand(rows, 16, 32, 32, generator=generator).bfloat16(),
            "text.long": torch.randn(rows, 256, 2304, generator=generator).bfloat16(),
            "mask.long": torch.ones(rows, 256, dtype=torch.bool),
            "ids": torch.tensor(ids),
        }
        tensors["names.utf8"], tensors["names.offsets"] = pack_strings([f"{i:07d}.jpg" for i in ids])
        captions = [f"a long caption of picture {i} " * 30 for i in ids]
        tensors["captions.long.utf8"], tensors["captions.long.offsets"] = pack_strings(captions)
        name = f"r000-256x256-{k:05d}.safetensors"
        write_tensors_atomic(root / SHARD_DIR / name, tensors)
        records.append({"shard": name, "bucket": [256, 256], "ids": ids, "key_masks": [1] * rows})
    empty = {"text": torch.zeros(1, 256, 2304), "mask": torch.zeros(1, 256, dtype=torch.bool)}
    write_tensors_atomic(root / EMPTY_FILE, empty)
    header = {
        **recipe_tables,
        "fingerprint": "bench",
        "mode": "sample",
        "caption_keys": ["long"],
        "text_shape": [256, 2304],
        "held_out": {"count": 8, "captions": ["held out"] * 8, "ids": list(range(count, count + 8))},
        "plugin_versions": {},
    }
    index, table = assemble_index(header, records)
    write_tensors_atomic(root / SAMPLES_FILE, table)
    write_json_atomic(root / INDEX_FILE, index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=("image_folder", "precomputed"), default="image_folder")
    parser.add_argument("--data", default=None, help="data folder to create/reuse (default: a temp folder)")
    parser.add_argument("--images", type=int, default=160, help="images (image_folder) or samples (precomputed)")
    parser.add_argument("--size", type=int, default=256, help="bucket size (image_folder's data.size)")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    parser.add_argument("--threads", type=int, default=2, help="data.decode_threads (image_folder)")
    parser.add_argument("--step-ms", type=float, default=150.0, help="host time blocked per model step")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps of one side")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per side")
    args = parser.parse_args()

    import torch

    from prx_core.slots import BatchRequest

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else Path(scratch) / args.source
        started = time.perf_counter()
        if args.source == "image_folder":
            write_photos(root, args.images)
            data = (
                f"{args.images} JPEGs, 640-1280 px long side, image_folder at size {args.size}, "
                f"micro-batch {args.batch}, decode_threads {args.threads}"
            )
        else:
            from prx_core.recipe import dump_toml, load
            from prx_core.testing.fixtures import TINY_RECIPE

            # The tiny test recipe (its towers are only named: reading batches loads neither).
            recipe_file = Path(scratch) / "recipe.toml"
            recipe_file.write_text(dump_toml({**TINY_RECIPE, "data": {"use": "precomputed", "path": str(root)}}))
            recipe = load(recipe_file)
            resolved = recipe.resolved()
            write_precomputed(root, args.images, {k: resolved[k] for k in ("latent_space", "text_encoder")})
            data = (
                f"precomputed, {args.images} samples of latent mean + std 16x32x32 and text 256x2304 (bf16), "
                f"page-cached, micro-batch {args.batch}"
            )
        written_s = time.perf_counter() - started

        def build(read_ahead: bool) -> Any:
            if args.source == "precomputed":
                from prx_core.builtins.precomputed import PrecomputedSource
                from prx_core.context import RunContext

                run = RunContext(recipe=recipe, device=torch.device("cpu"), run_dir=Path(scratch), rank=0, world_size=1)
                return PrecomputedSource(replace(recipe.slot_config("data"), read_ahead=read_ahead), run)
            from prx_image_folder import ImageFolderConfig
            from prx_image_folder.source import ImageFolderSource

            config = ImageFolderConfig(
                root=str(root),
                size=args.size,
                caption_weights={"caption": 1.0},
                held_out=0,
                decode_threads=args.threads,
                read_ahead=read_ahead,
                index_cache="off",
            )
            return ImageFolderSource(config, seed=0)

        sides = {"read-ahead": build(True), "no read-ahead": build(False)}
        next_step = dict.fromkeys(sides, 0)
        per_step: dict[str, list[float]] = {label: [] for label in sides}
        waits: dict[str, list[float]] = {label: [] for label in sides}

        def request(step: int) -> BatchRequest:
            return BatchRequest(step=step, micro_step=0, accumulation=1, rank=0, world_size=1, size=args.batch, seed=0)

        def drain(source: Any) -> None:
            """Wait for the read-ahead a block leaves running: it is part of that block's cost."""
            ahead = source._ahead  # noqa: SLF001
            if ahead is None:
                return
            for future in ahead.futures if hasattr(ahead, "futures") else [ahead[1]]:
                future.result()

        def run_block(label: str) -> tuple[float, float]:
            source = sides[label]
            waited = 0.0
            start = time.perf_counter()
            for _ in range(args.block):
                before = time.perf_counter()
                source.batch(request(next_step[label]))
                waited += time.perf_counter() - before
                next_step[label] += 1
                time.sleep(args.step_ms / 1e3)
            drain(source)
            return (time.perf_counter() - start) / args.block * 1e3, waited / args.block * 1e3

        for label in sides:  # warm-up: pools, the order plan, the first reads
            run_block(label)
        for _ in range(args.rounds):
            for label in sides:
                step_ms, wait_ms = run_block(label)
                per_step[label].append(step_ms)
                waits[label].append(wait_ms)

    for line in header(torch.device("cpu")):
        print(line)
    print(f"data     : {data} (written in {written_s:.1f} s)")
    print(
        f"timing   : wall clock; host blocked {args.step_ms:g} ms per model step (sleep); "
        f"{args.rounds} alternating blocks of {args.block} steps per side after one warm-up block"
    )
    print()
    print(f"{'side':<14} {'median ms/step':>15} {'data wait ms/step':>18}")
    for label in sides:
        print(f"{label:<14} {statistics.median(per_step[label]):>15.1f} {statistics.median(waits[label]):>18.1f}")
    speedup = statistics.median(per_step["no read-ahead"]) / statistics.median(per_step["read-ahead"])
    read_ms = statistics.median(waits["no read-ahead"])
    ideal = (args.step_ms + read_ms) / max(args.step_ms, read_ms)
    print()
    print(f"speed-up : {speedup:.2f}x (ideal max(step, read) instead of step + read: {ideal:.2f}x)")


if __name__ == "__main__":
    main()
