"""``prx-run`` itself on one GPU: PRX-1.2B at batch 32 in bf16, then a resume, timed end to end.

    python bench/fit_check.py            # on the GPU machine (bench/gpu_check.sh step 2)
    python bench/fit_check.py --tiny     # a two-block model on the CPU: checks this script only

1. ``prx-run`` trains the PRX-1.2B recipe (bench/_gpu_setup.py: full-size random T5-Gemma-2B and
   FLUX VAE, synthetic shapes at 256 px, AdamW, ``bf16_mixed``) for 60 steps at batch 32 with FLOP
   counting, a checkpoint at step 40 (written in the background) and 60, and the final sample grid.
2. A copy of that run directory without its step-60 checkpoint is resumed with ``--resume auto``
   to step 60: its logged losses at steps 50 and 60 are compared with the straight run's.

It prints images/s and MFU (the mean over the log windows after the first), peak memory allocated
and reserved, the checkpoint's wall time (blocking part and background write), the two commands'
wall times, and the resumed-vs-straight loss difference. On CUDA the difference is not 0: SDPA's
memory-efficient backward and scatter-add backward are non-deterministic (README, "Determinism").
The last line is the one-line summary ``bench/gpu_check.sh`` collects.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _gpu_setup import default_folder, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def prx_run(*args: str) -> float:
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "prx_core.cli", *args], check=True, cwd=ROOT, env=env)
    return time.perf_counter() - started


def logged(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if "loss" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the script)")
    parser.add_argument("--folder", type=Path, default=default_folder())
    args = parser.parse_args()
    folder = args.folder / ("tiny" if args.tiny else "full")
    recipe = write_recipe(folder, "fit_check", args.tiny, steps=60, checkpoint_every=40, log_every=10)
    straight, resumed = folder / "straight", folder / "resumed"
    for stale in (straight, resumed):
        shutil.rmtree(stale, ignore_errors=True)

    straight_s = prx_run(str(recipe), "--run-dir", str(straight))
    rows = logged(straight)
    steady = rows[1:] or rows  # the first window holds cuDNN autotuning and allocator growth
    images_per_s = sum(r["images_per_s"] for r in steady) / len(steady)
    mfu = [r["mfu"] for r in steady if "mfu" in r]
    allocated = max(r["peak_mem_gb"] for r in rows)
    reserved = max((r.get("peak_mem_reserved_gb", 0.0) for r in rows), default=0.0)
    log = (straight / "train.log").read_text(encoding="utf-8")
    blocking = [float(x) for x in re.findall(r"state copied in ([\d.]+) s", log)]
    written = [float(x) for x in re.findall(r"\(committed ([\d.]+) s after its save began", log)]
    grid = sorted((straight / "samples").glob("*.png"))

    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000060")
    resumed_s = prx_run(str(recipe), "--run-dir", str(resumed), "--resume", "auto")
    after = {r["step"]: r["loss"] for r in logged(resumed) if r["step"] > 40}
    before = {r["step"]: r["loss"] for r in rows if r["step"] > 40}
    diffs = [abs(after[s] - before[s]) for s in sorted(before) if s in after]
    if not diffs:
        raise SystemExit("fit_check: the resumed run logged no step after 40")

    mfu_text = f"{sum(mfu) / len(mfu):.3f}" if mfu else "n/a"
    print(f"straight run: {straight_s:.1f} s wall for 60 steps (setup, FLOP count, 2 checkpoints, grid, export)")
    print(f"resumed run : {resumed_s:.1f} s wall for steps 41-60")
    print(f"images/s    : {images_per_s:.1f} (mean of {len(steady)} log windows of 10 steps), MFU {mfu_text}")
    print(f"peak memory : {allocated:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    print(f"checkpoint  : blocking {blocking} s, committed after {written} s (background write)")
    print(f"sample grid : {[p.name for p in grid]}")
    print(f"resume      : |loss resumed - straight| at steps {sorted(after)}: {[f'{d:.2e}' for d in diffs]}")
    print(
        f"summary fit_check: {images_per_s:.0f} img/s, MFU {mfu_text}, peak {allocated:.1f} GiB alloc / "
        f"{reserved:.1f} GiB reserved, checkpoint {max(written, default=0):.1f} s "
        f"({max(blocking, default=0):.2f} s blocking), resume loss diff {max(diffs):.1e}"
    )


if __name__ == "__main__":
    main()
