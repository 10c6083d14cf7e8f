"""The count of host↔device copies and device reads in a training step must not grow.

``bench/host_syncs.py`` counts them on a CPU (see its docstring for how a CPU stands in for the
device). These tests first check the counter on hand-written code with known copies and reads,
then hold a real step of each benchmarked configuration to the targets.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "host_syncs.py"


@pytest.fixture(scope="module")
def host_syncs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("host_syncs", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["host_syncs"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_the_counter_sees_known_copies_and_reads(host_syncs: ModuleType) -> None:
    from prx_core import transfer

    device = host_syncs.SIMULATED_DEVICE
    with (
        transfer.simulated_accelerator(),
        host_syncs._tensors_report_their_place(),
        host_syncs.TransferCounter(transfer.simulated_device_generators) as counter,
    ):
        weights = torch.ones(3, device=device)  # made on the device: no copy
        host = torch.arange(3.0)  # made on the host
        on_device = host.to(device)  # copy 1
        total = (weights * on_device).sum()  # device work: nothing
        again = torch.zeros(2).to(weights.device)  # copy 2 (the device named by a device tensor)
        drawn = torch.rand(2, generator=transfer.device_generator(0, "x", device=device), device=device)
        _ = drawn + again  # device draws: nothing
        host.sum().item()  # a host value read on the host: nothing
        total.item()  # read 1
        bool(total > 0)  # read 2
        weights.tolist()  # read 3
        weights.cpu()  # read 4
        weights.nonzero()  # read 5 (its size depends on the values)
    counts = counter.counts
    assert counts.copies == 2 and counts.reads == 5, counts.where
    assert {kind for _, kind in counts.device_to_host} == {"item", "bool", "tolist", "cpu", "nonzero"}


@pytest.mark.parametrize("name", ["flow matching", "tread + ema + muon", "image folder (uint8)", "precomputed"])
def test_a_training_step_meets_the_targets(host_syncs: ModuleType, name: str) -> None:
    counts, steps = host_syncs.count_step(
        host_syncs.CONFIGURATIONS[name], steps=1, prepare=host_syncs.PREPARE.get(name)
    )
    copies = counts.by_role(counts.host_to_device)
    reads = counts.by_role(counts.device_to_host)
    micro_steps = steps * host_syncs.ACCUMULATION
    assert copies["batch"] == micro_steps, counts.where  # one batch copy per micro-step
    assert reads["finiteness check"] == steps, counts.where  # one read per optimizer step
    assert copies["other"] == 0 and reads["other"] == 0, counts.where
    # Token ids of cache misses: one copy per micro-step at most (one encoder forward for its misses),
    # and transformers' mask check once per forward at most.
    assert copies["text encoder (cache misses)"] <= micro_steps, counts.where
    assert reads["text encoder (cache misses)"] <= micro_steps, counts.where
    assert set(copies) <= {"batch", "text encoder (cache misses)"}, counts.where
    if name == "precomputed":  # no encoder runs: the stored latents, text and mask are the one copy
        assert counts.copies == micro_steps and counts.reads == steps, counts.where


def test_a_precomputed_batch_crosses_in_one_copy_with_its_text_cut(host_syncs: ModuleType) -> None:
    from prx_core import transfer
    from prx_core.slots import RawBatch
    from prx_core.towers import batch_to_device

    mask_BL = torch.zeros(2, 256, dtype=torch.bool)
    mask_BL[0, :40], mask_BL[1, :70] = True, True  # 70 tokens: cut to 128 at pad_multiple 64
    text_BLD, features = torch.rand(2, 256, 16) * mask_BL[..., None], {"repa": torch.rand(2, 16, 8)}
    raw = RawBatch(
        images_BCHW=None,
        captions=["a", "b"],
        latents_BCHW=torch.rand(2, 4, 8, 8),
        latent_std_BCHW=torch.rand(2, 4, 8, 8),
        text_BLD=text_BLD,
        mask_BL=mask_BL,
        features=features,
    )
    host_syncs._mark_host([raw.latents_BCHW, raw.latent_std_BCHW, text_BLD, mask_BL, features])
    with (
        transfer.simulated_accelerator(),
        host_syncs._tensors_report_their_place(),
        host_syncs.TransferCounter(transfer.simulated_device_generators) as counter,
    ):
        moved, lengths = batch_to_device(raw, host_syncs.SIMULATED_DEVICE, pad_multiple=64, empty_length=2)
    assert counter.counts.copies == 1 and counter.counts.reads == 0, counter.counts.where
    assert lengths == [40, 70] and moved.text_BLD is not None and moved.mask_BL is not None
    assert moved.text_BLD.shape == (2, 128, 16) and torch.equal(moved.text_BLD, text_BLD[:, :128])
    assert torch.equal(moved.mask_BL, mask_BL[:, :128]) and moved.features is not None
    assert torch.equal(moved.features["repa"], features["repa"])
