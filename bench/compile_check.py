"""The compiled PRX-1.2B step (``train.compile = "blocks"``): compile time, step time, recompiles.

    python bench/compile_check.py        # bench/gpu_check.sh step 6
    python bench/compile_check.py --tiny # on the CPU: checks the script only

Trains bench/fit_check.py's recipe (batch 32, 256 px) with regional compilation of each block for
8 steps and prints the first step's time (compilation), the median of the last 5 steps, and
TorchDynamo's counters: graphs compiled and recompilations. Captions differ in length, so with
text trimming a few text shapes appear; each new one costs a recompile, so the count should stay
at a handful, not grow with the steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _gpu_setup import default_folder, make_trainer, write_recipe

STEPS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--folder", type=Path, default=default_folder())
    args = parser.parse_args()
    from torch._dynamo.utils import counters

    folder = args.folder / ("tiny" if args.tiny else "full")
    recipe = write_recipe(folder, "compile", args.tiny, steps=100, count_flops=False, compile="blocks")
    trainer = make_trainer(recipe, folder / f"compile-{time.time_ns()}")
    device = trainer.run.device
    counters.clear()
    times = []
    for _ in range(STEPS):
        started = time.perf_counter()
        loss, _, _ = trainer.train_step(trainer.step)
        loss.item()  # wait for the device
        times.append(time.perf_counter() - started)
        trainer.step += 1
    graphs = int(counters["stats"].get("unique_graphs", 0))
    recompiles = sum(counters["recompiles"].values()) if "recompiles" in counters else 0
    steady = statistics.median(times[-5:]) * 1e3
    images_per_s = trainer.recipe.train.global_batch / (steady / 1e3)
    print(f"device {device}; step times (s): {[round(t, 2) for t in times]}")
    print(f"dynamo counters: stats {dict(counters['stats'])}, recompiles {dict(counters.get('recompiles', {}))}")
    print(
        f"summary compile: first step {times[0]:.1f} s, steady {steady:.0f} ms/step ({images_per_s:.0f} img/s), "
        f"{graphs} graphs, {recompiles} recompiles"
    )
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
