"""Single device vs 2-rank DDP vs 2-rank FSDP2 (and HSDP fallback), on CPU with gloo.

One ``torch.multiprocessing.spawn`` launch runs every scenario (process start-up dominates the
cost). Both ranks see the same data, so DDP/FSDP2 average identical gradients and must follow
the single-device run; the comparison reference runs in each worker with plain tensors.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prx_muon import MuonConfig, build_optimizer

WORLD = 2
STEPS = 3
#: Muon matrices: repeats (3 of a shape: an uneven split over 2 ranks), rows not divisible by
#: the world size (7), and a single-row matrix (one rank holds an empty shard).
BLOCK_SHAPES = [(24, 16), (16, 24), (24, 16), (7, 16), (24, 16), (1, 16), (16, 24)]


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Linear(n, m, bias=(i % 2 == 0)) for i, (m, n) in enumerate(BLOCK_SHAPES)
        )
        self.head = torch.nn.Linear(24, 5)
        self.norm = torch.nn.LayerNorm(24)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        loss = (self.head(self.norm(x_BD)) ** 2).mean()
        for layer in self.blocks:
            loss = loss + (torch.tanh(layer(x_BD[:, : layer.in_features])) ** 2).mean()
        return loss


def _make(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def _batch(step: int) -> torch.Tensor:
    return torch.randn(8, 24, generator=torch.Generator().manual_seed(1000 + step))


CONFIG = MuonConfig(lr=2e-2, weight_decay=0.1, adamw_weight_decay=0.1, muon_patterns=("blocks.*",))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        model(_batch(step)).backward()
        optimizer.step()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _compare(name: str, got: torch.nn.Module, want: torch.nn.Module) -> None:
    reference = dict(want.named_parameters())
    for raw_key, param in got.named_parameters():
        key = raw_key.removeprefix("module.")
        got_full, want_full = _full(param.detach()), reference[key].detach()
        error = (got_full - want_full).abs().max().item()
        assert torch.allclose(got_full, want_full, rtol=1.3e-6, atol=1e-5), f"{name} {key}: max abs error {error}"


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    _scenarios(rank)
    # The scenarios' DDP/FSDP modules are gone once they return; then leave the group together.
    from prx_core.distributed import shutdown

    shutdown()


def _scenarios(rank: int) -> None:
    from prx_muon.optimizer import MuonAdamW
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    # Count which orthogonalisation path each scenario takes, so none silently falls back.
    calls: dict[str, int] = {}
    for path in ("_orthogonalise_replicated", "_orthogonalise_row_sharded", "_orthogonalise_gathered"):
        original = getattr(MuonAdamW, path)

        def counted(self: MuonAdamW, *args: object, _original: object = original, _path: str = path) -> object:
            calls[_path] = calls.get(_path, 0) + 1
            return _original(self, *args)  # type: ignore[operator]

        setattr(MuonAdamW, path, counted)

    # Single device reference (every rank computes it locally, no collectives).
    reference = _make()
    ref_opt = build_optimizer(reference.named_parameters(), CONFIG)
    ref_opt.split_across_ranks = False
    assert len(ref_opt.param_groups[0]["params"]) == len(BLOCK_SHAPES)
    _train(reference, ref_opt, range(STEPS))
    assert not torch.equal(reference.blocks[0].weight, _make().blocks[0].weight)

    # DDP: replicated parameters; Newton–Schulz split over the ranks and all-gathered.
    ddp = DistributedDataParallel(_make())
    ddp_opt = build_optimizer(ddp.module.named_parameters(), CONFIG)
    _train(ddp, ddp_opt, range(STEPS))
    _compare("ddp", ddp, reference)
    assert calls == {"_orthogonalise_replicated": 4 * STEPS}, calls  # 4 distinct block shapes
    flat = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "DDP ranks diverged"

    # FSDP2: Shard(0) DTensors; owner ranks orthogonalise full matrices (all_to_all both ways).
    mesh = init_device_mesh("cpu", (WORLD,))
    sharded = _make()
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    fsdp_opt = build_optimizer(sharded.named_parameters(), CONFIG)
    _train(sharded, fsdp_opt, range(STEPS))
    _compare("fsdp2", sharded, reference)
    assert calls.get("_orthogonalise_row_sharded") == 4 * STEPS, calls
    buf = fsdp_opt.state[sharded.blocks[3].weight]["momentum_buffer"]
    assert isinstance(buf, DTensor) and buf.to_local().shape[0] == (4 if rank == 0 else 3)

    # FSDP2 optimizer state_dict round trip (DTensor state), then one more step on both.
    twin = _make(seed=1)
    for block in twin.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    twin.load_state_dict(sharded.state_dict())
    twin_opt = build_optimizer(twin.named_parameters(), CONFIG)
    # A deep copy, as a checkpoint would hold (state_dict() returns the live tensors).
    twin_opt.load_state_dict(copy.deepcopy(fsdp_opt.state_dict()))
    _train(sharded, fsdp_opt, range(STEPS, STEPS + 1))
    _train(twin, twin_opt, range(STEPS, STEPS + 1))
    for (key, a), b in zip(sharded.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.to_local(), b.to_local()), f"fsdp2 resume differs at {key}"

    # The same through torch.distributed.checkpoint's full (gathered, name-keyed) state dicts.
    options = StateDictOptions(full_state_dict=True)
    model_state = copy.deepcopy(get_model_state_dict(sharded, options=options))
    optimizer_state = copy.deepcopy(get_optimizer_state_dict(sharded, fsdp_opt, options=options))
    assert set(optimizer_state["state"]["blocks.0.weight"]) == {"momentum_buffer"}
    assert optimizer_state["state"]["head.weight"]["step"] == STEPS + 1
    restored = _make(seed=2)
    for block in restored.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(restored, mesh=mesh)
    restored_opt = build_optimizer(restored.named_parameters(), CONFIG)
    set_model_state_dict(restored, model_state, options=options)
    set_optimizer_state_dict(restored, restored_opt, optimizer_state, options=options)
    _train(sharded, fsdp_opt, range(STEPS + 1, STEPS + 2))
    _train(restored, restored_opt, range(STEPS + 1, STEPS + 2))
    for (key, a), b in zip(sharded.named_parameters(), restored.parameters(), strict=True):
        assert torch.equal(a.to_local(), b.to_local()), f"DCP resume differs at {key}"

    # HSDP-style 2-D mesh (Replicate, Shard(0)): the gather-everywhere fallback.
    mesh2d = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    hybrid = _make()
    fully_shard(hybrid, mesh=mesh2d)
    assert len(hybrid.blocks[0].weight.placements) == 2
    hybrid_opt = build_optimizer(hybrid.named_parameters(), CONFIG)
    _train(hybrid, hybrid_opt, range(STEPS))
    _compare("hsdp", hybrid, reference)
    assert calls.get("_orthogonalise_gathered") == 4 * STEPS, calls


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_single_device_ddp_and_fsdp2_agree(tmp_path: Path) -> None:
    # Spawned children import this module by name; make sure they can find it.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
