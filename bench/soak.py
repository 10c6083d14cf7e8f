"""Soak: does a long run hold its memory and file descriptors flat?

    python bench/soak.py                       # 3000 steps, a report every 250 steps
    python bench/soak.py --steps 6000 --report-every 500 --warmup 1000
    python bench/soak.py --source synthetic    # the synthetic_shapes source instead of JPEG files
    python bench/soak.py --text-cache-mb 1     # a text cache bound the captions exceed: it evicts all along

A tiny model (the test suite's recipe: 2 blocks of width 32, MiniLM text) trains on a folder of
small JPEGs with distinct captions through ``image_folder`` (decode threads and the read-ahead
of the next micro-batch on), with everything a real run does on a schedule: a sample grid and an
evaluation (validation loss) every ``--every`` steps, a checkpoint (background write, two kept)
every ``--every / 2`` steps, a metrics row every 50 steps. A probe plugin, registered next to the
recipe's plugins, reads after every ``--report-every`` optimizer steps: resident memory (VmRSS of
/proc/self/status), open file descriptors (/proc/self/fd), threads, and the text cache's size.

It prints one row per report, then the growth after warm-up (the first row at or after
``--warmup`` against the last) and its least-squares slope per 1000 steps over the rows after
warm-up. A leak shows as a slope that does not fall towards zero with more steps; the usual
suspects are the bounded text cache (it fills once per distinct caption, then stays bounded) and
the read-ahead and checkpoint threads (their count must stay constant).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import header  # noqa: E402
from PIL import Image  # noqa: E402

from prx_core import hookimpl  # noqa: E402


def proc_status() -> dict[str, float]:
    """VmRSS (MB) and thread count of this process, from /proc/self/status (Linux)."""
    fields: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            fields["rss_mb"] = int(value.split()[0]) / 1024  # kB
        elif key == "Threads":
            fields["threads"] = int(value)
    fields["fds"] = len(os.listdir("/proc/self/fd"))
    return fields


class Probe:
    """A plugin object: a reading after every ``every`` optimizer steps (and after the first)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.rows: list[dict[str, float]] = []
        self.started = time.perf_counter()

    @hookimpl
    def prx_after_optimizer_step(self, run: Any, step: int) -> None:
        if step != 1 and step % self.every:
            return
        cache = run.text_encoder
        self.rows.append(
            {
                "step": step,
                "seconds": time.perf_counter() - self.started,
                **proc_status(),
                "text_cache_mb": cache.cached_bytes / 2**20,
                "text_cache_entries": len(cache._cache),
            }
        )
        row = self.rows[-1]
        print(f"soak: step {step}, RSS {row['rss_mb']:.1f} MB, {row['fds']:.0f} fds", file=sys.stderr, flush=True)


def write_images(root: Path, count: int, seed: int = 0) -> None:
    """``count`` small JPEGs (64-128 px, five aspects) with one distinct caption each."""
    if (root / "captions.jsonl").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    aspects = (0.5, 0.75, 1.0, 4 / 3, 2.0)
    lines = []
    for i in range(count):
        long_side = int(rng.integers(96, 129))
        aspect = aspects[i % len(aspects)]
        width, height = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        pixels_HW3 = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(pixels_HW3).save(root / name, quality=85)
        lines.append(json.dumps({"file": name, "caption": f"picture number {i} of a soak test, seed {seed}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def slope_per_1000(rows: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of ``key`` against step, times 1000."""
    steps = [r["step"] for r in rows]
    values = [r[key] for r in rows]
    mean_s, mean_v = statistics.fmean(steps), statistics.fmean(values)
    var = sum((s - mean_s) ** 2 for s in steps)
    return 1000 * sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values, strict=True)) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (3000)")
    parser.add_argument("--report-every", type=int, default=250, help="steps between readings (250)")
    parser.add_argument("--warmup", type=int, default=500, help="growth is measured from this step on (500)")
    parser.add_argument("--every", type=int, default=500, help="steps between sample grids and evaluations (500)")
    parser.add_argument("--images", type=int, default=300, help="JPEGs in the folder (300)")
    parser.add_argument("--source", choices=("image_folder", "synthetic"), default="image_folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--text-cache-mb",
        type=float,
        help="bound the text cache to this (default: prx's 256 MB, which 300 captions never reach; "
        "a bound below the captions' ~5.6 MB makes it evict all along)",
    )
    parser.add_argument("--workdir", type=Path, help="keep the images and the run here (default: a temp dir)")
    args = parser.parse_args()
    if args.steps <= args.warmup + args.report_every:
        parser.error("--steps must exceed --warmup by more than one --report-every")
    torch.set_num_threads(args.threads)

    from prx_core.recipe import deep_merge, dump_toml, load
    from prx_core.testing.fixtures import TINY_RECIPE
    from prx_core.text_cache import CachedTextEncoder
    from prx_core.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        data: dict[str, Any] = {"use": "synthetic_shapes", "size": 32, "max_shapes": 2}
        if args.source == "image_folder":
            write_images(work / "images", args.images)
            data = {"use": "image_folder", "root": str(work / "images"), "size": 32, "held_out": 8, "min_side": 32}
        tables = deep_merge(
            copy.deepcopy(TINY_RECIPE),
            {
                "name": "soak",
                "train": {
                    "steps": args.steps,
                    "log_every": 50,
                    "checkpoint_every": max(1, args.every // 2),
                    "keep_checkpoints": 2,
                    "sample_every": args.every,
                },
                "eval": {"every": args.every, "at_end": True},
            },
        )
        tables["data"] = data  # replaced, not merged: the sources take different keys
        recipe_path = work / "soak.toml"
        recipe_path.write_text(dump_toml(tables), encoding="utf-8")
        recipe = load(recipe_path)
        probe = Probe(args.report_every)
        recipe.active.manager.register(probe, name="soak_probe")
        run_dir = work / "run"
        trainer = Trainer(recipe, run_dir, resume="auto")
        trainer.setup()
        if args.text_cache_mb is not None:
            cache = trainer.run.text_encoder
            if not isinstance(cache, CachedTextEncoder):
                raise TypeError(f"the run's text encoder is {type(cache).__name__}, not prx's CachedTextEncoder")
            cache.max_bytes = int(args.text_cache_mb * 2**20)
        started = time.perf_counter()
        result = trainer.fit()
        minutes = (time.perf_counter() - started) / 60

    device = torch.device("cpu")
    print("\n".join(header(device)))
    print(
        f"run      : {result.step} steps in {minutes:.1f} min, {args.source} data ({args.images} images, 32 px), "
        f"sample grid + evaluation every {args.every}, checkpoint every {max(1, args.every // 2)}, "
        f"torch threads {args.threads}, text cache bound "
        + (f"{args.text_cache_mb:g} MB" if args.text_cache_mb is not None else "default")
    )
    print()
    print(f"{'step':>6} {'min':>6} {'RSS MB':>8} {'fds':>5} {'threads':>8} {'text cache MB':>14} {'entries':>8}")
    for row in probe.rows:
        print(
            f"{row['step']:>6.0f} {row['seconds'] / 60:>6.1f} {row['rss_mb']:>8.1f} {row['fds']:>5.0f} "
            f"{row['threads']:>8.0f} {row['text_cache_mb']:>14.2f} {row['text_cache_entries']:>8.0f}"
        )
    after = [r for r in probe.rows if r["step"] >= args.warmup]
    first, last = after[0], after[-1]
    print(f"\ngrowth after warm-up (step {first['step']:.0f} -> {last['step']:.0f}), and slope per 1000 steps:")
    for key, unit in (("rss_mb", "MB"), ("fds", "fds"), ("threads", "threads"), ("text_cache_mb", "MB")):
        delta = last[key] - first[key]
        print(f"  {key:<14} {delta:+9.2f} {unit:<8} slope {slope_per_1000(after, key):+8.2f} {unit}/1000 steps")


if __name__ == "__main__":
    main()
