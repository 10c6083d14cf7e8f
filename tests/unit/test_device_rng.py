"""Device RNG state in checkpoints: one state per rank, restored on any number of GPUs."""

from __future__ import annotations

import torch

from prx_core.seeding import device_rng_states, restore_device_rng


def _states(count: int) -> list[torch.Tensor]:
    return [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]


def test_a_cpu_run_saves_no_device_state_and_restores_nothing() -> None:
    assert device_rng_states(torch.device("cpu")) == []
    assert restore_device_rng(_states(8), torch.device("cpu")) is None


def test_a_checkpoint_from_more_gpus_than_exist_resumes() -> None:
    # An older checkpoint saved every visible GPU's state (8); this resume has 2 GPUs.
    applied: list[tuple[int, torch.device]] = []

    def set_state(state: torch.Tensor, device: torch.device) -> None:
        applied.append((int(state[0]), device))

    saved = _states(8)
    for index in (0, 1):
        restore_device_rng(saved, torch.device("cuda", index), set_state)
    assert applied == [(0, torch.device("cuda", 0)), (1, torch.device("cuda", 1))]  # each its own


def test_a_single_saved_state_serves_every_rank_and_a_higher_index() -> None:
    applied: list[int] = []
    for index in (0, 3):
        restore_device_rng(_states(1), torch.device("cuda", index), lambda s, d: applied.append(int(s[0])))
    # Index 3 of a 2-state list is out of range too: it falls back to the first state.
    restore_device_rng(_states(2), torch.device("cuda", 3), lambda s, d: applied.append(int(s[0])))
    assert applied == [0, 0, 0]
    assert restore_device_rng([], torch.device("cuda", 0), lambda s, d: applied.append(-1)) is None
    assert applied == [0, 0, 0]
