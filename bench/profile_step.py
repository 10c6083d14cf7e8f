"""Three PRX-1.2B training steps under the PyTorch profiler: syncs, copies, attention, GPU idle time.

    python bench/profile_step.py         # bench/gpu_check.sh step 3 (after fit_check built the towers)
    python bench/profile_step.py --tiny  # on the CPU: checks the script only

The trainer of bench/fit_check.py's recipe (batch 32, 256 px, random full-size towers) trains two
steps to warm up, then three under ``torch.profiler``. Per step it prints:

* host→device and device→host copies (CUDA ``Memcpy`` activities) and host-side waits
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``);
* the attention kernels (names with ``fmha``, ``flash`` or ``attention``) and their share of GPU
  kernel time;
* the GPU idle fraction: the part of the profiled span with no kernel running.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from _gpu_setup import default_folder, make_trainer, write_recipe
from torch.profiler import ProfilerActivity, profile

STEPS = 3
ATTENTION = re.compile(r"fmha|flash|attention|attn", re.IGNORECASE)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--folder", type=Path, default=default_folder())
    args = parser.parse_args()
    folder = args.folder / ("tiny" if args.tiny else "full")
    recipe = write_recipe(folder, "profile", args.tiny, steps=100, count_flops=False)
    trainer = make_trainer(recipe, folder / f"profile-{time.time_ns()}")
    device = trainer.run.device
    for _ in range(2):
        trainer.train_step(trainer.step)
        trainer.step += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            trainer.train_step(trainer.step)
            trainer.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = list(prof.events())
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in gpu if not e.name.startswith("Memcpy") and not e.name.startswith("Memset")]
    h2d = sum(1 for e in gpu if "HtoD" in e.name)
    d2h = sum(1 for e in gpu if "DtoH" in e.name)
    syncs = {name: sum(1 for e in events if e.name == name) for name in SYNCS}
    kernel_us = sum(e.time_range.end - e.time_range.start for e in kernels)
    attention = [e for e in kernels if ATTENTION.search(e.name)]
    attention_us = sum(e.time_range.end - e.time_range.start for e in attention)
    intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    idle = 1 - busy_time(intervals) / span if span else float("nan")
    names = sorted({e.name for e in attention})
    print(prof.key_averages().table(sort_by="cuda_time_total" if gpu else "cpu_time_total", row_limit=25))
    print(
        f"per step: {h2d / STEPS:.1f} host→device copies, {d2h / STEPS:.1f} device→host copies, "
        f"waits { ({k: v / STEPS for k, v in syncs.items()}) }"
    )
    print(f"attention kernels: {names[:4]}{' …' if len(names) > 4 else ''}")
    share = attention_us / kernel_us if kernel_us else float("nan")
    print(f"attention share of GPU kernel time: {share:.1%}; GPU idle fraction: {idle:.1%}")
    print(
        f"summary profile: {h2d / STEPS:.1f} H2D + {d2h / STEPS:.1f} D2H copies and "
        f"{sum(syncs.values()) / STEPS:.1f} syncs per step, attention {share:.0%} of kernel time "
        f"({names[0][:40] if names else 'none'}), GPU idle {idle:.0%}"
    )


if __name__ == "__main__":
    main()
