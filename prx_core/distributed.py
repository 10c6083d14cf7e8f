"""Multi-process training with plain ``torch.distributed``: DDP or FSDP2 (``fully_shard``).

Launch with ``torchrun`` or ``accelerate launch`` (both set RANK / WORLD_SIZE / LOCAL_RANK);
the same code runs on one CPU process, on 2 CPU processes with gloo (as the tests do), and on
many GPUs with NCCL. Accelerate's ``Accelerator`` is deliberately not used: it ignores FSDP on
CPU, and without ``cpu=True`` under torchrun CPU ranks silently train alone.

The trainer replays the denoiser block by block, so the parallel wrapper goes around
:class:`DenoiserForward`, a module whose ``forward`` is that block loop: DDP's reducer and
FSDP2's unshard/reshard hooks then see every forward.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger("prx")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistEnv:
    """Join the process group a launcher describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # On GPUs, NCCL for device tensors and gloo for the few CPU ones (e.g. the stop flag that
        # all ranks agree on): with "nccl" alone a CPU tensor has no backend to reduce it.
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt != "0":
            # After a restart by torchrun the launcher's store still holds the failed attempt's keys
            # (each rank's gloo address, NCCL's unique id): a rank that read one before its peer
            # rewrote it would connect to a dead process. A prefix per attempt keeps them apart.
            store, _, _ = next(dist.rendezvous("env://"))
            attempt_store = dist.PrefixStore(f"prx/attempt_{attempt}/", store)
            dist.init_process_group(backend=backend, store=attempt_store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(finished: bool = True) -> None:
    """Leave the process group. After a run that finished, ranks leave together: a rank that tears
    down its gloo pairs while another still works (rank 0 exporting, say) can abort that process at
    exit. After an error there is no barrier, since the other ranks may never reach it."""
    if dist.is_initialized():
        try:
            if finished:
                dist.barrier()
        finally:
            # DDP/FSDP wrappers hold the group and gloo's last work objects; those already dropped
            # but kept alive by reference cycles go now, while the interpreter is whole. Freed
            # during interpreter teardown instead, gloo's threads can abort the process at exit.
            gc.collect()
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank if it is True on at least one (e.g. a SIGTERM that reached one rank)."""
    if not env.active:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_across_ranks(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    if not env.active:
        return value
    # gloo reduces CPU tensors, NCCL device tensors; keep the tensor where it lives.
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / env.world_size


class DenoiserForward(torch.nn.Module):
    """The module the parallel wrapper sees: ``forward`` is the trainer's block loop.

    It owns ``trainable`` as a submodule (no copy), so parameters, state dicts and the
    optimizer all refer to the same tensors.
    """

    def __init__(self, trainable: torch.nn.Module, step_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.trainable = trainable
        self._step_fn = step_fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._step_fn(self.trainable, *args, **kwargs)


def fsdp_mixed_precision(compute_dtype: torch.dtype | None) -> Any:
    """FSDP2's policy for a precision policy that computes in ``compute_dtype`` (None: no autocast).

    Weights are all-gathered in the compute dtype (half the bytes of fp32 under bf16 autocast,
    which would cast them on use anyway) and gradients reduce-scattered in fp32, so the sum over
    ranks does not round. Forward inputs are not cast: the step's data stays fp32 (``x_t``, ``t``
    and the text states), as on one process.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def wrap(
    module: DenoiserForward,
    env: DistEnv,
    strategy: str,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """DDP or FSDP2 around the forward module; identity on one process.

    ``compute_dtype`` is the precision policy's autocast dtype; FSDP2 gathers weights in it.
    """
    if not env.active:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        # Bucket views: the gradients live in DDP's all-reduce buckets instead of beside them,
        # which saves one gradient-sized copy (4.4 GiB for PRX-1.2B in fp32).
        return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_mixed_precision(compute_dtype)
        trainable: Any = module.trainable
        # One FSDP unit per block (unsharded just in time by its own pre-forward hook), one per
        # plugin module (loss terms call them outside the denoiser forward), and the root for the
        # embedders and final layer.
        for block in trainable.model.blocks:
            fully_shard(block, mp_policy=policy)
        for extra in trainable.extras.values():
            fully_shard(extra, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
        return module
    raise ValueError(f"unknown parallel strategy {strategy!r}; use 'ddp' or 'fsdp2'")


@contextmanager
def gradient_sync(wrapped: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final micro-steps of gradient accumulation."""
    if enabled:
        yield
        return
    no_sync = getattr(wrapped, "no_sync", None)
    if no_sync is not None:  # DDP
        with no_sync():
            yield
        return
    set_sync = getattr(wrapped, "set_requires_gradient_sync", None)
    if set_sync is not None:  # FSDP2
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
        return
    with nullcontext():
        yield


def reshard(module: torch.nn.Module) -> None:
    """Free the unsharded weights an FSDP2 forward without backward (a grid, an evaluation) left.

    FSDP2 keeps the root's weights unsharded after its forward, expecting the backward; without
    one they would stay gathered (in the compute dtype) until the next training step.
    """
    from torch.distributed.fsdp import FSDPModule

    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (unsharded, CPU) model and optimizer state dicts; a collective when sharded."""
    if not is_sharded(module):
        return module.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(module, options=options),
        get_optimizer_state_dict(module, optimizer, options=options),
    )


def load_full_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optim_state: dict[str, Any]
) -> None:
    if not is_sharded(module):
        module.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model_state, options=options)
    set_optimizer_state_dict(module, optimizer, optim_state, options=options)


def total_grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """Global gradient norm; sharded (DTensor) gradients are reduced across ranks."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm
