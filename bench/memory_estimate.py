"""Peak GPU memory per process of recipes, estimated on a CPU (fake CUDA tensors; no GPU needed).

    python bench/memory_estimate.py                              # the baseline and pixel 1024
    python bench/memory_estimate.py recipes/pixel_1024.toml --set train.micro_batch=32
    python bench/memory_estimate.py recipes/baseline.toml --gpus 16

For each recipe it prints the components (weights, gradients, optimizer state, DDP buckets, EMA,
frozen towers, text cache, activations) side by side with activation checkpointing off and on, and
whether each fits an 80 GB card less the headroom. How the activations are counted:
:mod:`prx_core.memory` (``saved_tensors_hooks`` on the real block loop under CUDA bf16 autocast).
``prx-run check --memory`` runs the same estimate on every CUDA recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import header

from prx_core.memory import DEFAULT_GPU_GIB, DEFAULT_WORLD_SIZE, GIB, HEADROOM_GIB, estimate_recipe, with_checkpointing
from prx_core.recipe import load

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "recipes", nargs="*", type=Path, default=[ROOT / "recipes/baseline.toml", ROOT / "recipes/pixel_1024.toml"]
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus", type=int, default=DEFAULT_WORLD_SIZE, help="processes the run is launched on")
    parser.add_argument("--gpu-gb", type=float, default=DEFAULT_GPU_GIB)
    args = parser.parse_args()
    for line in header(torch.device("cpu")):
        print(line)
    budget = args.gpu_gb - HEADROOM_GIB
    print(f"budget: {args.gpu_gb:g} GB card less {HEADROOM_GIB:g} GiB headroom = {budget:g} GiB; {args.gpus} GPUs")
    for path in args.recipes:
        recipe = load(path, args.overrides)
        started = time.perf_counter()
        off = estimate_recipe(with_checkpointing(recipe, False), args.gpus)
        on = estimate_recipe(with_checkpointing(recipe, True), args.gpus)
        seconds = time.perf_counter() - started
        print(
            f"\n{path} ({recipe.model.depth} blocks, {off.parameters / 1e9:.2f}B parameters, "
            f"estimated in {seconds:.1f} s)"
        )
        print(
            f"  batch {off.per_gpu_batch} per GPU × {off.accumulation} accumulation; recipe: checkpointing "
            f"{'on' if recipe.train.activation_checkpointing else 'off'}"
        )
        print(f"  {'GiB':<14}{'ckpt off':>10}{'ckpt on':>10}")
        for (name, gib_off), (_, gib_on) in zip(off.rows(), on.rows(), strict=True):
            print(f"  {name:<14}{gib_off:>10.2f}{gib_on:>10.2f}")
        print(f"  {'per block':<14}{off.block_saved / GIB:>10.2f}{'':>10}")
        print(f"  {'fits':<14}{str(off.fits(args.gpu_gb)):>10}{str(on.fits(args.gpu_gb)):>10}")
        if off.not_counted:
            print(f"  not counted: {', '.join(off.not_counted)}")
        chosen = on if recipe.train.activation_checkpointing else off
        print(f"summary {path.name}: {chosen.total / GIB:.1f} GiB, fits={chosen.fits(args.gpu_gb)}")


if __name__ == "__main__":
    main()
