"""Stateless seeding: every random draw in a step comes from a generator keyed by where it is.

Keying generators by (seed, purpose, step, micro-step, rank) instead of advancing one global
RNG makes resume exact by construction, makes gradient accumulation and recomputation see the
same draws, and keeps ranks independent.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from a base seed and any keys (stable across processes and Python runs)."""
    text = ":".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator_for(seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *keys))
    return generator
