"""The sample order: which dataset items every micro-batch of every rank trains on.

The order is a pure function of (request, per-sample bucket ids, seed), so a resumed run replays
exactly the items the original would have seen (mid-epoch too), ranks never share an item within
an epoch, and changing ``seed`` changes the order (reference.md §7.6).

Layout of epoch ``e`` (``S`` = the micro-batch size, ``request.size``):

1. every bucket's items are permuted with a generator keyed by ``(seed, "order", e, bucket)``;
2. each permuted bucket is cut into chunks of ``S`` items. The incomplete tail (fewer than ``S``
   items) is **dropped** for this epoch, so no item is seen twice in an epoch; the tail differs
   every epoch because the permutation does, so no item is dropped for good unless its bucket
   holds fewer than ``S`` items altogether;
3. the list of all chunks is shuffled with a generator keyed by ``(seed, "chunks", e)``.

Chunk number ``k = request.first_sample() // S`` (that is ``(step·acc + micro)·world + rank``) is
chunk ``k mod C`` of epoch ``k div C``, with ``C`` chunks per epoch. Each micro-batch is one chunk,
so it holds a single bucket and stacks into one tensor.

Building an epoch costs one permutation per bucket and one over the chunks (tens of
milliseconds at a million items); the last two epochs are cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from prx_core.seeding import derive_seed
from prx_core.slots import BatchRequest

#: Epoch layouts kept per plan: the current one, and the previous for ranks still finishing it.
_EPOCH_CACHE = 2


def _rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


@dataclass(frozen=True)
class EpochLayout:
    """One epoch: the chunks in training order and each bucket's permutation."""

    #: Positions of every chunk, in the order they are trained: [chunks, batch size].
    chunks_CS: np.ndarray
    #: Bucket id -> that bucket's positions in this epoch's permuted order.
    permutations: dict[int, np.ndarray]
    #: Position -> its index inside its bucket's permutation (for substitutes).
    rank_in_bucket_N: np.ndarray


class OrderPlan:
    """The order over a fixed list of samples, each with a bucket id.

    Positions are indices into ``bucket_ids``; callers map them to their own item ids.
    """

    def __init__(self, bucket_ids: Sequence[int] | np.ndarray, batch_size: int, seed: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ids_N = np.asarray(bucket_ids, dtype=np.int64)
        if ids_N.ndim != 1:
            raise ValueError(f"bucket_ids must be one-dimensional, got shape {ids_N.shape}")
        if ids_N.size and ids_N.min() < 0:
            raise ValueError("bucket ids must be >= 0")
        self.bucket_ids_N = ids_N
        self.batch_size = batch_size
        self.seed = int(seed)
        # A stable sort keeps each bucket's members in position order, the base every epoch permutes.
        by_bucket = np.argsort(ids_N, kind="stable")
        buckets, starts, counts = np.unique(ids_N[by_bucket], return_index=True, return_counts=True)
        self.members: dict[int, np.ndarray] = {
            int(b): by_bucket[s : s + c] for b, s, c in zip(buckets, starts, counts, strict=True)
        }
        self.chunks_per_bucket = {b: len(m) // batch_size for b, m in self.members.items()}
        self.chunks_per_epoch = sum(self.chunks_per_bucket.values())
        if self.chunks_per_epoch == 0:
            sizes = ", ".join(f"bucket {b}: {len(m)}" for b, m in self.members.items()) or "no samples"
            raise ValueError(
                f"no bucket holds a full micro-batch of {batch_size} samples ({sizes}); "
                "add data, lower the batch size, or turn buckets off"
            )
        self._epochs: OrderedDict[int, EpochLayout] = OrderedDict()

    @property
    def samples_per_epoch(self) -> int:
        """Samples trained per epoch (the dropped tails excluded)."""
        return self.chunks_per_epoch * self.batch_size

    @property
    def never_trained(self) -> int:
        """Samples in buckets too small to fill one micro-batch: these are never trained on."""
        return sum(len(m) for b, m in self.members.items() if self.chunks_per_bucket[b] == 0)

    def epoch(self, epoch: int) -> EpochLayout:
        """The layout of ``epoch`` (computed once, then cached)."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            self._epochs.move_to_end(epoch)
            return cached
        size = self.batch_size
        permutations: dict[int, np.ndarray] = {}
        rank_N = np.zeros(len(self.bucket_ids_N), dtype=np.int64)
        pieces = []
        for bucket, members in self.members.items():
            perm = members[_rng(self.seed, "order", epoch, bucket).permutation(len(members))]
            permutations[bucket] = perm
            rank_N[perm] = np.arange(len(perm))
            full = self.chunks_per_bucket[bucket] * size
            if full:
                pieces.append(perm[:full].reshape(-1, size))
        chunks_CS = np.concatenate(pieces)
        chunks_CS = chunks_CS[_rng(self.seed, "chunks", epoch).permutation(len(chunks_CS))]
        layout = EpochLayout(chunks_CS=chunks_CS, permutations=permutations, rank_in_bucket_N=rank_N)
        self._epochs[epoch] = layout
        while len(self._epochs) > _EPOCH_CACHE:
            self._epochs.popitem(last=False)
        return layout

    def locate(self, chunk: int) -> tuple[int, int]:
        """``(epoch, chunk index inside the epoch)`` of global chunk number ``chunk``."""
        if chunk < 0:
            raise ValueError(f"chunk number must be >= 0, got {chunk}")
        return divmod(chunk, self.chunks_per_epoch)

    def chunk(self, chunk: int) -> list[int]:
        """Positions of global chunk number ``chunk``."""
        epoch, within = self.locate(chunk)
        return [int(p) for p in self.epoch(epoch).chunks_CS[within]]

    def for_request(self, request: BatchRequest) -> list[int]:
        """Positions for a batch request; its size must be this plan's batch size."""
        if request.size != self.batch_size:
            raise ValueError(f"request size {request.size} differs from the plan's batch size {self.batch_size}")
        return self.chunk(request.first_sample() // request.size)

    def substitutes(self, chunk: int, slot: int) -> Iterator[int]:
        """Replacements for the sample in ``slot`` of chunk ``chunk``, in the order to try them.

        All come from the same bucket (the batch still stacks), and every rank derives the same
        ones without talking to the others: first the bucket's tail that this epoch drops (items
        not trained otherwise this epoch), then the bucket's other chunks, starting with the one
        after this chunk. Items of this chunk itself are never offered, so a substitute does not
        duplicate a sample of the same batch.
        """
        epoch, within = self.locate(chunk)
        layout = self.epoch(epoch)
        position = int(layout.chunks_CS[within, slot])
        bucket = int(self.bucket_ids_N[position])
        perm = layout.permutations[bucket]
        full = self.chunks_per_bucket[bucket] * self.batch_size
        for p in perm[full:]:
            yield int(p)
        chunk_start = int(layout.rank_in_bucket_N[position]) // self.batch_size * self.batch_size
        for step in range(self.batch_size, full):
            yield int(perm[(chunk_start + step) % full])
