"""Stateless seeding: every random draw in a step comes from a generator keyed by where it is.

Keying generators by (seed, purpose, step, micro-step, rank) instead of advancing one global
RNG makes resume exact by construction, makes gradient accumulation and recomputation see the
same draws, and keeps ranks independent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from a base seed and any keys (stable across processes and Python runs)."""
    text = ":".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator_for(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator


def device_rng_states(device: torch.device) -> list[torch.Tensor]:
    """The RNG state of this process's accelerator only, as a one-item list (empty on a CPU).

    Not every visible GPU's: a run resumed on fewer GPUs than it saved on must still load it.
    """
    if device.type != "cuda":
        return []
    return [torch.cuda.get_rng_state(device)]


def restore_device_rng(
    states: list[torch.Tensor],
    device: torch.device,
    set_state: Callable[[torch.Tensor, torch.device], None] | None = None,
) -> torch.Tensor | None:
    """Restore a saved device RNG state on ``device`` if one fits; return the state used.

    Checkpoints hold one state (this format) or one per GPU visible when they were saved (older
    prx). The state at this device's index is used when there is one, else the first: a resume on
    fewer GPUs, or on a CPU, never fails on the count (the step's draws come from keyed
    generators, so only plugin code that draws from the global device RNG could notice).
    """
    if device.type != "cuda" or not states:
        return None
    index = device.index or 0
    state = states[index] if len(states) > 1 and index < len(states) else states[0]
    (set_state or _set_cuda_state)(state, device)
    return state


def _set_cuda_state(state: torch.Tensor, device: torch.device) -> None:
    torch.cuda.set_rng_state(state, device)
