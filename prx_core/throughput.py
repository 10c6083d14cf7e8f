"""Throughput figures: FLOPs counted on the real step, model FLOP utilisation, peak memory.

MFU uses FLOPs counted by PyTorch's FLOP counter on one real training micro-step (forward and
backward), not 6·N·tokens, which over-counts PRX about 2.6× (reference.md §1, §6).
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch

#: Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, by a substring of the name.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def count_step_flops(run_micro_step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one forward + backward, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = run_micro_step()
        loss.backward()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
