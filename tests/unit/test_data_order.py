"""The sample order: deterministic, seeded, resumable, rank-disjoint, one bucket per batch."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from prx_core.data.order import OrderPlan
from prx_core.seeding import derive_seed
from prx_core.slots import BatchRequest

# 3 buckets of 10, 7 and 2 samples, interleaved: with batch 3 that is 3 + 2 + 0 chunks per epoch.
BUCKETS = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 2, 0, 2, 0]


def request(step: int, micro: int = 0, acc: int = 1, rank: int = 0, world: int = 1, size: int = 3, seed: int = 0):
    return BatchRequest(
        step=step, micro_step=micro, accumulation=acc, rank=rank, world_size=world, size=size, seed=seed
    )


def reference_epoch(bucket_ids: list[int], size: int, seed: int, epoch: int) -> list[list[int]]:
    """The order as the module docstring states it, written out plainly (a loop per bucket)."""
    chunks = []
    for bucket in sorted(set(bucket_ids)):
        members = [i for i, b in enumerate(bucket_ids) if b == bucket]
        rng = np.random.default_rng(derive_seed(seed, "order", epoch, bucket))
        permuted = [members[j] for j in rng.permutation(len(members))]
        for start in range(0, len(permuted) - size + 1, size):
            chunks.append(permuted[start : start + size])
    shuffle = np.random.default_rng(derive_seed(seed, "chunks", epoch)).permutation(len(chunks))
    return [chunks[j] for j in shuffle]


def test_layout_matches_the_documented_rule() -> None:
    plan = OrderPlan(BUCKETS, 3, seed=7)
    assert plan.chunks_per_epoch == 3 + 2
    for epoch in range(3):
        got = [plan.chunk(epoch * plan.chunks_per_epoch + k) for k in range(plan.chunks_per_epoch)]
        assert got == reference_epoch(BUCKETS, 3, 7, epoch)


def test_deterministic_and_seed_dependent() -> None:
    a = [OrderPlan(BUCKETS, 3, seed=0).for_request(request(s)) for s in range(10)]
    b = [OrderPlan(list(BUCKETS), 3, seed=0).chunk(s) for s in range(10)]
    assert a == b
    c = [OrderPlan(BUCKETS, 3, seed=1).for_request(request(s)) for s in range(10)]
    assert a != c, "changing the seed must change the order (reference.md §7.6)"


def test_every_batch_is_one_bucket() -> None:
    plan = OrderPlan(BUCKETS, 3, seed=0)
    for k in range(40):
        assert len({BUCKETS[p] for p in plan.chunk(k)}) == 1


def test_each_sample_at_most_once_per_epoch_and_tails_dropped() -> None:
    plan = OrderPlan(BUCKETS, 3, seed=0)
    for epoch in range(4):
        seen = [p for k in range(plan.chunks_per_epoch) for p in plan.chunk(epoch * plan.chunks_per_epoch + k)]
        assert len(seen) == len(set(seen)) == plan.samples_per_epoch == 15
        per_bucket = Counter(BUCKETS[p] for p in seen)
        assert per_bucket == {0: 9, 1: 6}  # 10 -> 9, 7 -> 6, bucket 2 (2 samples) never fills a batch
    assert plan.never_trained == 2


def test_tails_rotate_between_epochs() -> None:
    plan = OrderPlan(BUCKETS, 3, seed=0)
    covered: set[int] = set()
    for k in range(20 * plan.chunks_per_epoch):
        covered.update(plan.chunk(k))
    assert covered == {i for i, b in enumerate(BUCKETS) if b != 2}


def test_ranks_are_disjoint_within_a_step_and_cover_the_stream() -> None:
    ids = [i % 4 for i in range(400)]
    plan = OrderPlan(ids, 5, seed=3)
    for step in range(6):
        got = [
            plan.for_request(request(step, micro, acc=2, rank=r, world=4, size=5))
            for micro in range(2)
            for r in range(4)
        ]
        flat = [p for batch in got for p in batch]
        assert len(flat) == len(set(flat)) == 40
        # The same chunks a single process would read at the same global positions.
        single = [OrderPlan(ids, 5, seed=3).chunk(step * 8 + j) for j in range(8)]
        assert got == single


def test_a_resumed_run_replays_the_same_samples() -> None:
    ids = [i % 3 for i in range(90)]

    def run(plan: OrderPlan, steps: range) -> list[list[int]]:
        return [
            plan.for_request(request(s, m, acc=2, rank=r, world=2, size=4))
            for s in steps
            for m in range(2)
            for r in range(2)
        ]

    full = run(OrderPlan(ids, 4, seed=11), range(0, 30))  # several epochs (~5 steps each)
    resumed = run(OrderPlan(ids, 4, seed=11), range(17, 30))  # a fresh plan, mid-epoch
    assert resumed == full[17 * 4 :]


def test_substitutes_stay_in_the_bucket_and_out_of_the_batch() -> None:
    plan = OrderPlan(BUCKETS, 3, seed=0)
    for k in range(plan.chunks_per_epoch):
        batch = plan.chunk(k)
        bucket = BUCKETS[batch[0]]
        subs = list(plan.substitutes(k, 1))
        assert subs and all(BUCKETS[p] == bucket for p in subs)
        assert not set(subs) & set(batch)
        assert len(subs) == len(set(subs))
        members = [i for i, b in enumerate(BUCKETS) if b == bucket]
        assert len(subs) == len(members) - 3
        # The epoch's dropped tail is offered first: those items are not trained otherwise.
        trained = {p for j in range(plan.chunks_per_epoch) for p in plan.chunk(j)}
        tail = [p for p in members if p not in trained]
        assert set(subs[: len(tail)]) == set(tail)


def test_errors() -> None:
    with pytest.raises(ValueError, match="no bucket holds a full micro-batch"):
        OrderPlan([0, 1, 2], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        OrderPlan([0, 0], 0, seed=0)
    with pytest.raises(ValueError, match="differs"):
        OrderPlan([0, 0, 0, 0], 2, seed=0).for_request(request(0, size=4))


def test_a_million_samples_is_cheap() -> None:
    ids = np.random.default_rng(0).integers(0, 27, size=1_000_000)
    start = time.perf_counter()
    plan = OrderPlan(ids, 32, seed=42)
    first = plan.chunk(0)
    later = plan.chunk(5_000)
    elapsed = time.perf_counter() - start
    assert len(first) == len(later) == 32
    assert elapsed < 5.0, f"planning an epoch of 1M samples took {elapsed:.2f}s"
    start = time.perf_counter()
    for k in range(1000):
        plan.chunk(k)
    assert time.perf_counter() - start < 1.0, "a cached epoch must answer in microseconds per batch"
