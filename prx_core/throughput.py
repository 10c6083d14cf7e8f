"""Throughput figures: FLOPs counted on the real step, model FLOP utilisation, peak memory.

MFU uses FLOPs counted by PyTorch's FLOP counter on one real training micro-step (forward and
backward), not 6·N·tokens, which over-counts PRX about 2.6× (reference.md §1, §6).
"""

from __future__ import annotations

import resource
from collections.abc import Callable

import torch

#: Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, as ``(name fragments, peak)``: the first
#: row whose fragments all occur in ``torch.cuda.get_device_name()`` wins, so variants come before
#: the plain name (an "H100 PCIe" is not an SXM H100). From NVIDIA's datasheets, halving the
#: with-sparsity figures they headline.
PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("GB200",), 2500e12),
    (("B200",), 2250e12),
    (("GH200",), 989.4e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989.4e12),  # H200 SXM: the H100 SXM's tensor cores, more and faster memory
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989.4e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("H800", "PCIe"), 756e12),
    (("H800",), 989.4e12),
    (("A100",), 312e12),  # SXM4 and PCIe alike
    (("A800",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("A10G",), 70e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its CUDA device name, or None when it is not in the table."""
    upper = device_name.upper()
    for fragments, peak in PEAK_BF16_FLOPS:
        if all(fragment.upper() in upper for fragment in fragments):
            return peak
    return None


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
    return peak_bf16_flops(torch.cuda.get_device_name(device))


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_memory_reserved_gb(device: torch.device) -> float | None:
    """Peak memory the CUDA caching allocator reserved (what ``nvidia-smi`` shows, minus the context),
    None off CUDA. Above the allocated peak by the allocator's fragmentation and cache."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / 2**30
