"""Scenarios that tests run on several gloo ranks with ``torch.multiprocessing.spawn``.

They live in an importable module because spawned workers import their target by module name
(a test file is not importable by the children once another distribution owns ``tests``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prx_core.trainer import Trainer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _params(trainer: Trainer) -> torch.Tensor:
    """All weights, gathered; sharded state is only materialised on rank 0 (others get an empty tensor)."""
    from prx_core.distributed import full_state

    state, _ = full_state(trainer.run.require("trainable"), trainer.optimizer)
    if not state:
        return torch.zeros(0)
    return torch.cat([v.detach().float().flatten().cpu() for _, v in sorted(state.items())])


def _join_gloo_world(rank: int, world: int, port: int, **extra: str) -> None:
    """The environment ``torchrun`` would give this rank (plus ``extra``), one torch thread per rank."""
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **extra,
        }
    )
    torch.set_num_threads(1)


def _run_scenario(
    rank: int, world: int, port: int, result: Path, body: Callable[..., dict[str, object]], strategy: str, **env: str
) -> None:
    """Join the gloo world, run ``body``, write what it found (or its traceback) to ``result``, leave.

    ``body`` returns before the group is left, so its trainers (and their DDP/FSDP wrappers, which
    hold the group) are gone by then, as at the end of ``prx-run``.
    """
    _join_gloo_world(rank, world, port, **env)
    try:
        out = body(rank, world, result.parent, strategy)
    except Exception:  # report to the parent, which asserts
        out = {"error": traceback.format_exc()}
    result.write_text(json.dumps(out))
    from prx_core.distributed import shutdown

    shutdown()


def resume_scenarios(rank: int, world: int, port: int, workdir: str, strategy: str) -> None:
    _run_scenario(rank, world, port, Path(workdir) / f"result_{strategy}_{rank}.json", _resume_body, strategy)


def _resume_body(rank: int, world: int, root: Path, strategy: str) -> dict[str, object]:
    import torch.distributed as dist

    from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe

    out: dict[str, object] = {}
    patch = {"train": {"parallel": strategy, "steps": 6, "checkpoint_every": 100}}
    recipe_dir = root / f"recipe_rank{rank}"

    # 1. Straight: 4 steps.
    straight = make_trainer(tiny_recipe(recipe_dir, patch), root / "straight")
    out["straight_losses"] = run_steps(straight, 4)
    out["straight_params"] = _params(straight).tolist()
    # Gradient sync: every rank holds the same weights after the steps (they saw different data).
    # Under FSDP2 each rank holds a shard, so compare the local parameters' checksum under DDP only.
    if strategy == "ddp":
        local = (
            torch.cat([p.detach().flatten() for p in straight.run.require("trainable").parameters()]).sum().reshape(1)
        )
        gathered = [torch.zeros(1) for _ in range(world)]
        dist.all_gather(gathered, local)
        out["params_agree_across_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)
    else:
        out["params_agree_across_ranks"] = True
    from prx_core.slots import BatchRequest

    request = BatchRequest(step=0, micro_step=0, accumulation=1, rank=rank, world_size=world, size=2, seed=0)
    out["first_sample"] = request.first_sample()

    # 2. Two steps, checkpoint, a fresh trainer resumes, two more steps.
    first = make_trainer(tiny_recipe(recipe_dir, patch), root / "resumed")
    run_steps(first, 2)
    first.save()
    second = make_trainer(tiny_recipe(recipe_dir, patch), root / "resumed", resume="auto")
    out["resumed_at"] = second.step
    out["resumed_losses"] = run_steps(first, 0) + run_steps(second, 2)
    out["resumed_params"] = _params(second).tolist()

    # 3. Negative control: drop the data position (restart at step 0 with the resumed weights).
    control = make_trainer(tiny_recipe(recipe_dir, patch), root / "resumed", resume="auto")
    control.step = 0
    out["control_losses"] = run_steps(control, 2)
    # Gradient-norm consistency: every rank clips with the same global norm.
    _, _, grad_norm = control.train_step(control.step)
    out["grad_norm"] = grad_norm.item()

    # 4. A signal that reaches one rank only: both ranks stop at the same step boundary and save.
    stopper = make_trainer(tiny_recipe(recipe_dir, patch), root / "stopped")
    original = stopper.train_step

    def train_step(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        result = original(step)
        if rank == 1 and step == 1:
            signal.raise_signal(signal.SIGTERM)
        return result

    stopper.train_step = train_step  # type: ignore[method-assign]
    fit = stopper.fit()
    out["stopped_at"] = fit.step
    out["stopped_early"] = fit.stopped_early
    out["checkpoints"] = [c.step for c in stopper.checkpoints.committed()]
    return out


def muon_scenarios(rank: int, world: int, port: int, workdir: str, strategy: str) -> None:
    """The ``muon`` optimizer through the trainer on ``world`` gloo ranks (reference.md §7.7: not only FSDP2).

    1. Straight: 4 steps, with a checkpoint after step 2 (saving changes nothing). 2. A fresh
    trainer resumes that checkpoint and trains steps 3 and 4: must equal the straight run bitwise
    (losses and gathered weights). 3. The straight run again with
    ``train.compile = "blocks"`` (``aot_eager`` backend), compiled after DDP/FSDP2 wrapping: must
    match the eager run to rounding. Results go to ``muon_<strategy>_<rank>.json``.
    """
    result = Path(workdir) / f"muon_{strategy}_{rank}.json"
    _run_scenario(rank, world, port, result, _muon_body, strategy, PRX_COMPILE_BACKEND="aot_eager")


def _muon_body(rank: int, world: int, root: Path, strategy: str) -> dict[str, object]:
    from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe

    out: dict[str, object] = {}
    patch = {
        "train": {"parallel": strategy, "steps": 6, "checkpoint_every": 100},
        "optimizer": {"use": "muon", "lr": 1e-3},
    }
    recipe_dir = root / f"recipe_rank{rank}"
    straight = make_trainer(tiny_recipe(recipe_dir, patch), root / "straight")
    out["optimizer"] = type(straight.optimizer).__name__
    out["groups"] = [len(g["params"]) for g in straight.optimizer.param_groups]
    losses = run_steps(straight, 2)
    straight.save()
    out["straight_losses"] = losses + run_steps(straight, 2)
    out["straight_params"] = _params(straight).tolist()

    second = make_trainer(tiny_recipe(recipe_dir, patch), root / "straight", resume="auto")
    out["resumed_at"] = second.step
    out["resumed_losses"] = run_steps(second, 2)
    out["resumed_params"] = _params(second).tolist()

    compiled_patch = {**patch, "train": {**patch["train"], "compile": "blocks"}}
    compiled = make_trainer(tiny_recipe(root / f"compiled_rank{rank}", compiled_patch), root / "compiled")
    blocks = compiled.run.require("trainable").model.blocks
    out["blocks_compiled"] = all(block._compiled_call_impl is not None for block in blocks)
    out["compiled_losses"] = run_steps(compiled, 4)
    out["compiled_params"] = _params(compiled).tolist()
    return out


def fsdp_eval_scenarios(rank: int, world: int, port: int, workdir: str, strategy: str) -> None:
    """FSDP2 under ``bf16_mixed``: the mixed-precision policy is applied (weights gathered in bf16,
    stored and reduced in fp32), and an evaluation whose held-out items split unevenly over the
    ranks finishes (each rank runs the same number of forwards). Results: ``fsdp_eval_<rank>.json``."""
    _run_scenario(rank, world, port, Path(workdir) / f"fsdp_eval_{rank}.json", _fsdp_eval_body, strategy)


def _fsdp_eval_body(rank: int, world: int, root: Path, strategy: str) -> dict[str, object]:
    from prx_core.testing.fixtures import make_trainer, run_steps, tiny_recipe

    patch = {
        "train": {"parallel": strategy, "steps": 4, "checkpoint_every": 100},
        "precision": {"use": "bf16_mixed"},
        # 3 items on 2 ranks in chunks of 1: rank 0 runs 2 chunks, rank 1 only 1 without padding.
        "eval": {"num_samples": 3, "batch": 1},
    }
    trainer = make_trainer(tiny_recipe(root / f"recipe_rank{rank}", patch), root / "run")
    block = trainer.run.require("trainable").model.blocks[0]
    seen: list[str] = []
    hook = block.gate_proj.register_forward_pre_hook(lambda module, args: seen.append(str(module.weight.dtype)))
    losses = run_steps(trainer, 1)
    hook.remove()
    results = trainer.evaluate()
    return {
        "mp_param_dtype": str(block._get_fsdp_state()._mp_policy.param_dtype),
        "mp_reduce_dtype": str(block._get_fsdp_state()._mp_policy.reduce_dtype),
        "weight_dtype_in_forward": seen[0] if seen else "",
        "stored_dtypes": sorted({str(p.dtype) for p in trainer.run.require("trainable").parameters()}),
        "grad_dtypes": sorted(
            {str(p.grad.dtype) for p in trainer.run.require("trainable").parameters() if p.grad is not None}
        ),
        "loss": losses[0],
        "eval_loss": results["eval/loss"],
    }
