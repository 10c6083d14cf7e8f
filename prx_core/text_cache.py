"""A bounded cache of per-caption text encodings.

Captions repeat (small datasets, fixed evaluation prompts, the empty prompt), and on small
models the frozen text encoder can cost more than the denoiser step. Each caption is encoded
on its own, so its encoding never depends on which other captions shared its batch; a resumed
run therefore sees bitwise the same states as an uninterrupted one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from prx_core.slots import TextEncoder


class CachedTextEncoder:
    def __init__(self, encoder: TextEncoder, max_entries: int = 4096) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self.encoder = encoder
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(prompt)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(prompt)
            return cached
        self.misses += 1
        states_1LD, mask_1L = self.encoder.encode([prompt])
        if self.max_entries:
            self._cache[prompt] = (states_1LD, mask_1L)
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return states_1LD, mask_1L

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._one(p) for p in prompts]
        return torch.cat([s for s, _ in pairs]), torch.cat([m for _, m in pairs])

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.empty()

    def stats(self) -> dict[str, float]:
        """The encoder's counters (e.g. truncated prompts); none from a lazy encoder not loaded yet."""
        if not getattr(self.encoder, "loaded", True):
            return {}
        stats = getattr(self.encoder, "stats", None)
        return dict(stats()) if stats is not None else {}
