"""Pixel-space PRX-1.2B at 1024 px: peak GPU memory with and without activation checkpointing.

    python bench/pixel_memory.py         # bench/gpu_check.sh step 5
    python bench/pixel_memory.py --tiny  # on the CPU: checks the script only

Per configuration (images per GPU, checkpointing) it trains two steps of the pixel recipe
(patch 32, bottleneck 256, x-prediction, random full-size T5-Gemma) on synthetic 1024-px images and
prints torch's peak allocated and reserved memory beside the estimate of ``prx-run check
--memory`` (prx_core.memory, on one GPU), or OOM. Batch 32 without checkpointing is the old
recipe default (expected to run out of memory on 80 GB); 16 is the recipe's micro-batch now.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from _gpu_setup import default_folder, make_trainer, write_recipe

from prx_core.memory import GIB, estimate_recipe
from prx_core.recipe import load

CONFIGS = ((32, False), (32, True), (16, False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--folder", type=Path, default=default_folder())
    args = parser.parse_args()
    folder = args.folder / ("tiny" if args.tiny else "full")
    recipe_path = write_recipe(folder, "pixel", args.tiny, pixel=True, steps=100, count_flops=False)
    results = []
    for batch, checkpointing in CONFIGS:
        overrides = [f"train.global_batch={batch}", f"train.activation_checkpointing={str(checkpointing).lower()}"]
        estimate = estimate_recipe(load(recipe_path, overrides), world_size=1).total / GIB
        label = f"batch {batch:>2}, checkpointing {'on ' if checkpointing else 'off'}"
        trainer = None
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            trainer = make_trainer(recipe_path, folder / f"pixel-{time.time_ns()}", overrides)
            for _ in range(2):
                trainer.train_step(trainer.step)
                trainer.step += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                allocated = torch.cuda.max_memory_allocated() / GIB
                reserved = torch.cuda.max_memory_reserved() / GIB
                verdict = f"{allocated:6.1f} GiB allocated, {reserved:6.1f} reserved"
            else:
                verdict = "ran (no CUDA: no memory figures)"
            verdict += f", estimate {estimate:.1f} GiB, {time.perf_counter() - started:.0f} s"
        except torch.OutOfMemoryError:
            verdict = f"OOM (estimate {estimate:.1f} GiB)"
        finally:
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"{label}: {verdict}")
        results.append(f"b{batch}{'+ckpt' if checkpointing else ''} {verdict.split(',')[0].strip()}")
    print("summary pixel_memory: " + "; ".join(results))


if __name__ == "__main__":
    main()
