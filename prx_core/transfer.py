"""Getting a step's inputs onto the device: one copy, and random draws made where they are used.

On a GPU every ``tensor.to(device)`` from pageable host memory is a copy *and* a host stall (the
copy waits for the stream), and every draw from a CPU generator that feeds the GPU is such a copy.
A step therefore makes one copy per input tensor from page-locked memory without waiting
(:func:`to_device`), keeps pixel data uint8 until it is on the device (4× fewer bytes than fp32,
:func:`images_to_float`), and draws its per-step noise, timesteps and routes from device generators
(:func:`device_generator`). On a CPU nothing changes: the same CPU generators draw in the same
order, so CPU runs (and the checkpoint-compatibility fixture) keep their numbers bit for bit.

``bench/host_syncs.py`` counts the copies and syncs of a real step on a CPU-only machine. It runs
the step inside :func:`simulated_accelerator`, which makes the code take its accelerator branches
(device generators, non-blocking copies) while every tensor stays on the CPU, so the counts are
those a CUDA run makes; :data:`simulated_device_generators` tells it which CPU generators stand
for device generators there.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from prx_core.seeding import generator_for

_simulating = False
#: Generators :func:`device_generator` made inside :func:`simulated_accelerator` (CPU generators
#: standing for device ones, so the host-sync count can tell device draws from host draws).
simulated_device_generators: weakref.WeakSet[torch.Generator] = weakref.WeakSet()


def on_accelerator(device: torch.device) -> bool:
    """Whether ``device`` is an accelerator (or the CPU standing for one in the host-sync count)."""
    return device.type != "cpu" or _simulating


@contextmanager
def simulated_accelerator() -> Iterator[None]:
    """Take the accelerator code paths on the CPU (for counting transfers; numbers change)."""
    global _simulating
    previous, _simulating = _simulating, True
    try:
        yield
    finally:
        _simulating = previous


def device_generator(seed: int, *keys: object, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` keyed by ``(seed, *keys)``, or None on a CPU.

    On a CPU the caller keeps drawing from its CPU step generator, in the order it always has, so
    CPU results do not change; on an accelerator the draw happens there, with no copy, and is as
    much a function of the keys as a CPU draw (so resume stays exact on the same device type).
    """
    if not on_accelerator(device):
        return None
    generator = generator_for(seed, *keys, device=device)
    if _simulating:
        simulated_device_generators.add(generator)
    return generator


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` in one copy: from pinned memory and non-blocking on CUDA.

    The caching host allocator keeps the pinned buffer alive until the copy has run, so the host
    goes on launching work instead of waiting for the stream. On a CPU it is ``tensor.to(device)``.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=on_accelerator(device))


#: Byte alignment of each tensor inside a packed copy, so every piece can be viewed back as its dtype.
_PACK_ALIGNMENT = 16


def to_device_packed(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` on ``device`` in ONE copy: their bytes packed into one host buffer, copied
    (pinned, non-blocking on CUDA), then viewed back as each tensor's dtype and shape there.

    A precomputed batch is four tensors (latent mean and std, text states, mask); one copy instead
    of four means one transfer to wait for instead of four. On a CPU each tensor is returned as it is.
    """
    if not on_accelerator(device) or len(tensors) < 2:
        return [to_device(t, device) for t in tensors]
    pieces: list[torch.Tensor] = []
    offsets: list[int] = []
    size = 0
    for tensor in tensors:
        raw_bytes = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        offsets.append(size)
        pieces.append(raw_bytes)
        padding = -raw_bytes.numel() % _PACK_ALIGNMENT
        if padding:
            pieces.append(torch.zeros(padding, dtype=torch.uint8))
        size += raw_bytes.numel() + padding
    packed = to_device(torch.cat(pieces), device)
    return [
        packed[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        for offset, t in zip(offsets, tensors, strict=True)
    ]


def images_to_float(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Images as float32 in [0, 1]: uint8 pixels divided by 255 (where they are), float as they are.

    The division is the decoder's own (``to(float32).div_(255)``), so converting on the device
    gives bit for bit the values a CPU conversion gives.
    """
    if images_BCHW.dtype == torch.uint8:
        return images_BCHW.to(torch.float32).div_(255.0)
    if not images_BCHW.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images_BCHW.dtype}")
    return images_BCHW.to(torch.float32)
