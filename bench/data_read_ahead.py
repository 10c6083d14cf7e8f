"""Does decoding the next micro-batch in the background hide the data source behind the step?

    python bench/data_read_ahead.py                          # 160 JPEGs of 640-1280 px, batch 16, 150 ms steps
    python bench/data_read_ahead.py --step-ms 50 --batch 32 --threads 4

It writes a folder of photo-sized JPEGs with a caption sidecar (once, into ``--data``), builds
the ``image_folder`` source on it twice, with ``read_ahead`` on and off, and runs a training-like
loop on each: ``source.batch(request)`` and then a stand-in for the model step that keeps the
host thread blocked for ``--step-ms`` (``time.sleep``: on a GPU the host waits for the device
like this; a CPU-bound stand-in would instead compete with the decode threads for cores, which
is a different question). The two sides alternate in blocks of ``--block`` steps; each block's
time includes waiting for the read-ahead it left running, so no decoding is done for free in the
other side's block.

It prints, per side, the median wall time per step and the time per step spent inside
``batch()`` (the main thread waiting for images), and the speed-up of read-ahead. The ideal is a
step of max(step, decode) instead of step + decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="image folder to create/reuse (default: a temp folder)")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", type=int, default=256, help="bucket size (data.size)")
    parser.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    parser.add_argument("--threads", type=int, default=2, help="data.decode_threads")
    parser.add_argument("--step-ms", type=float, default=150.0, help="host time blocked per model step")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps of one side")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per side")
    args = parser.parse_args()

    import torch
    from prx_image_folder import ImageFolderConfig
    from prx_image_folder.source import ImageFolderSource

    from prx_core.slots import BatchRequest

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.data) if args.data else Path(scratch) / "photos"
        started = time.perf_counter()
        write_photos(root, args.images)
        written_s = time.perf_counter() - started

        def build(read_ahead: bool) -> ImageFolderSource:
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
            ahead = source._ahead  # noqa: SLF001 - the left-over read-ahead is part of this block's cost
            if ahead is not None:
                for future in ahead.futures:
                    future.result()
            return (time.perf_counter() - start) / args.block * 1e3, waited / args.block * 1e3

        for label in sides:  # warm-up: pools, the order plan, the first decodes
            run_block(label)
        for _ in range(args.rounds):
            for label in sides:
                step_ms, wait_ms = run_block(label)
                per_step[label].append(step_ms)
                waits[label].append(wait_ms)

    for line in header(torch.device("cpu")):
        print(line)
    print(
        f"data     : {args.images} JPEGs, 640-1280 px long side (written in {written_s:.1f} s), "
        f"image_folder at size {args.size}, micro-batch {args.batch}, decode_threads {args.threads}"
    )
    print(
        f"timing   : wall clock; host blocked {args.step_ms:g} ms per model step (sleep); "
        f"{args.rounds} alternating blocks of {args.block} steps per side after one warm-up block"
    )
    print()
    print(f"{'side':<14} {'median ms/step':>15} {'data wait ms/step':>18}")
    for label in sides:
        print(f"{label:<14} {statistics.median(per_step[label]):>15.1f} {statistics.median(waits[label]):>18.1f}")
    speedup = statistics.median(per_step["no read-ahead"]) / statistics.median(per_step["read-ahead"])
    decode_ms = statistics.median(waits["no read-ahead"])
    ideal = (args.step_ms + decode_ms) / max(args.step_ms, decode_ms)
    print()
    print(f"speed-up : {speedup:.2f}x (ideal max(step, decode) instead of step + decode: {ideal:.2f}x)")


if __name__ == "__main__":
    main()
