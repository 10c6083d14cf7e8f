"""A cache of per-caption text encodings, bounded in bytes, that encodes a batch's misses at once.

Captions repeat (small datasets, fixed evaluation prompts, the empty prompt), and on small models
the frozen text encoder can cost more than the denoiser step. On large data nearly every caption
is new, so what matters there is that the misses of a micro-batch go through the encoder in *one*
forward (not one batch-1 forward each) and that the cache cannot grow into the GPU memory the
step needs: it holds only each caption's real tokens (padding is zeros and is rebuilt), in at most
``max_bytes``, least recently used first out.

Entries stay where the encoder made them (the device), so a hit costs no copy. A caption's
encoding does not depend on the captions it shared a forward with: each is padded to the
encoder's ``max_length`` whatever the batch, and the encoder masks padding (checked bitwise for
MiniLM on a CPU in ``tests/unit/test_text_cache.py``), so a resumed run, whose cache starts empty,
sees the same states as an uninterrupted one.

:meth:`CachedTextEncoder.encode_batch` also returns every row's token count, known on the host
(from the tokenizer) without reading the device, so the trainer can trim the text to the batch's
longest caption and drop the attention mask when nothing is padded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from prx_core.slots import TextEncoder

#: Default bound on the cached states: ~220 T5Gemma-2B captions of 256 tokens in bf16, ~1500 of
#: 40 tokens. Entries hold real tokens only, so typical captions cost a fraction of ``max_length``.
DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _Entry:
    states_ND: torch.Tensor  # the caption's real tokens only (N = its token count)
    mask_N: torch.Tensor  # all True, kept so padding the batch needs no host-made tensor

    @property
    def bytes(self) -> int:
        return self.states_ND.numel() * self.states_ND.element_size() + self.mask_N.numel()


def padded_length(longest: int, max_length: int, multiple: int) -> int:
    """The text length of a batch: its longest caption rounded up to ``multiple``, at most ``max_length``.

    ``multiple`` 0 keeps ``max_length`` (no trimming). Rounding keeps the number of distinct
    lengths small (one compiled shape and one attention plan each) and the length kernel-friendly.
    """
    if multiple < 0:
        raise ValueError(f"pad multiple must be >= 0, got {multiple}")
    if multiple == 0:
        return max_length
    return min(max_length, max(multiple, -(-longest // multiple) * multiple))


def token_counts(mask_BL: torch.Tensor) -> list[int]:
    """Real tokens per row of a (host) mask; on a device tensor this reads the device."""
    return [int(n) for n in mask_BL.sum(dim=1).tolist()]


class CachedTextEncoder:
    def __init__(self, encoder: TextEncoder, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.encoder = encoder
        self.dim = encoder.dim
        self.max_length = encoder.max_length
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._empty: _Entry | None = None  # "" is asked for every step: kept outside the bound
        self.cached_bytes = 0
        self.hits = 0
        self.misses = 0
        #: Encoder forwards run for misses (one per batch that had any).
        self.forwards = 0

    def _encode_misses(self, prompts: list[str]) -> list[_Entry]:
        """One encoder forward for ``prompts``; each row trimmed to its real tokens."""
        counted = getattr(self.encoder, "encode_with_lengths", None)
        if counted is not None:
            states_BLD, mask_BL, lengths = counted(prompts)
        else:  # an encoder that cannot tell its lengths on the host: one device read per batch
            states_BLD, mask_BL = self.encoder.encode(prompts)
            lengths = token_counts(mask_BL)
        self.forwards += 1
        # A copy per row: a slice would keep the whole padded batch alive in the cache.
        return [_Entry(states_BLD[i, :n].clone(), mask_BL[i, :n].clone()) for i, n in enumerate(lengths)]

    def _store(self, prompt: str, entry: _Entry) -> None:
        if entry.bytes > self.max_bytes:
            return
        self._cache[prompt] = entry
        self.cached_bytes += entry.bytes
        while self.cached_bytes > self.max_bytes:
            _, evicted = self._cache.popitem(last=False)
            self.cached_bytes -= evicted.bytes

    def _empty_entry(self) -> _Entry:
        if self._empty is None:
            states_1LD, mask_1L = self.encoder.empty()
            (length,) = token_counts(mask_1L)  # once per run
            self._empty = _Entry(states_1LD[0, :length], mask_1L[0, :length])
        return self._empty

    def _entries(self, prompts: list[str]) -> list[_Entry]:
        found: dict[str, _Entry] = {}
        missing: list[str] = []
        for prompt in prompts:
            if prompt in found or prompt in missing:
                continue
            entry = self._empty_entry() if prompt == "" else self._cache.get(prompt)
            if entry is None:
                missing.append(prompt)
                continue
            if prompt:
                self._cache.move_to_end(prompt)
            found[prompt] = entry
        self.misses += sum(1 for p in prompts if p in missing)
        self.hits += len(prompts) - sum(1 for p in prompts if p in missing)
        if missing:
            for prompt, entry in zip(missing, self._encode_misses(missing), strict=True):
                found[prompt] = entry
                self._store(prompt, entry)
        return [found[p] for p in prompts]

    def encode_batch(self, prompts: list[str], pad_multiple: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(states_BLD, mask_BL, token_counts)``, L the longest caption rounded up to ``pad_multiple``
        (at most ``max_length``; ``pad_multiple`` 0: exactly ``max_length``, as :meth:`encode`).

        Rows equal the encoder's own padded output, cut to L: padding is zero, the mask False there.
        """
        if isinstance(prompts, str):
            raise TypeError("encode_batch takes a list of prompts, not a single string")
        if not prompts:
            states_0LD, mask_0L = self.encoder.encode([])
            return states_0LD, mask_0L, []
        entries = self._entries(list(prompts))
        lengths = [entry.mask_N.shape[0] for entry in entries]
        length = padded_length(max(lengths), self.max_length, pad_multiple)
        states_BND = pad_sequence([e.states_ND for e in entries], batch_first=True)
        mask_BN = pad_sequence([e.mask_N for e in entries], batch_first=True, padding_value=False)
        pad = length - states_BND.shape[1]
        states_BLD = torch.nn.functional.pad(states_BND, (0, 0, 0, pad))
        mask_BL = torch.nn.functional.pad(mask_BN, (0, pad), value=False)
        return states_BLD, mask_BL, lengths

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The :class:`TextEncoder` call: states and mask padded to ``max_length``."""
        states_BLD, mask_BL, _ = self.encode_batch(prompts)
        return states_BLD, mask_BL

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._empty_entry()  # the one read of its length happens here (at setup), not in a step
        return self.encoder.empty()

    def stats(self) -> dict[str, float]:
        """The encoder's counters (e.g. truncated prompts); none from a lazy encoder not loaded yet."""
        if not getattr(self.encoder, "loaded", True):
            return {}
        stats = getattr(self.encoder, "stats", None)
        return dict(stats()) if stats is not None else {}
