"""``MuonAdamW``: Muon on the block matrices and AdamW on everything else, in one optimizer.

One :class:`torch.optim.Optimizer` subclass with two parameter groups (``name`` ``"muon"`` and
``"adamw"``), so ``state_dict``/``load_state_dict``, ``LambdaLR`` schedules, per-group LR
reporting and checkpoints work as for any torch optimizer.

Muon update, per matrix W with gradient G (reference.md §4):

    B ← β·B + G                         momentum buffer (β = 0.95)
    U = G + β·B  (Nesterov)  or  B
    O = NewtonSchulz5(U)                 batched over same-shape matrices, in ``ns_dtype``
    W ← W·(1 − lr·wd)                    decoupled weight decay
    W ← W − lr·0.2·√max(m, n)·O

AdamW follows ``torch.optim.AdamW``'s foreach implementation operation for operation (so it is
bitwise equal to it when weights and state share a dtype), but keeps its moments in
``state_dtype`` whatever the weights' dtype: under the ``bf16_weights`` precision policy the
moments stay fp32, which ``torch.optim.AdamW`` cannot do.

Where Newton–Schulz runs (reference.md §7.7: the reference only worked under FSDP2 with a 1-D mesh):

* **Single process**: every same-shape batch is orthogonalised locally with batched matmuls.
* **Replicated parameters (DDP)**: every rank holds the same averaged gradient, so the momentum
  update is computed everywhere, and each same-shape batch is split into ``world`` contiguous
  chunks; rank r orthogonalises chunk r and an ``all_gather`` gives every rank all results.
  Each rank does 1/world of the Newton–Schulz work and all ranks apply identical bytes.
* **FSDP2 (DTensor parameters, ``Shard(0)`` on a 1-D mesh)**: momentum lives on the local shard.
  For each same-shape batch, one ``all_to_all`` sends every shard of matrix j to its owner rank
  (chunk ownership as above), the owner orthogonalises its full matrices batched, and a second
  ``all_to_all`` sends each rank its shard of the result. Other DTensor layouts (HSDP, 2-D
  meshes) fall back to gathering full matrices on every rank (correct, but redundant work).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from prx_core.optim import adamw_step, load_state_keeping_dtype
from prx_muon.newton_schulz import NS_COEFFICIENTS, NS_EPS, newton_schulz, update_scale

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment, misc]

__all__ = ["MuonAdamW"]


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank actually holds (a DTensor's local shard; a view, so in-place ops write through)."""
    if _is_dtensor(tensor):
        local: torch.Tensor = cast(Any, tensor).to_local()
        return local
    return tensor


class MuonAdamW(Optimizer):
    """Muon for ``muon_params`` (2-D), AdamW for ``adamw_params``. See the module docstring.

    ``ns_dtype`` is the dtype Newton–Schulz computes in (an algorithm choice; bf16 in the
    reference). ``state_dtype`` is the dtype of momentum buffers and AdamW moments; ``None``
    keeps them in each parameter's dtype (``torch.optim`` behaviour). ``split_across_ranks``
    splits the Newton–Schulz work across ranks when ``torch.distributed`` is initialised and
    the parameters are plain (replicated) tensors; turn it off if ranks hold different
    parameters. ``process_group`` is the group replicated parameters are synchronised over.
    ``ns_max_batch`` caps how many same-shape matrices one Newton–Schulz matmul covers: ``None``
    all of them, ``"auto"`` all of them on an accelerator and one at a time on a CPU (faster
    there: the matrices stay in cache across the iterations).
    """

    def __init__(
        self,
        muon_params: Iterable[torch.Tensor],
        adamw_params: Iterable[torch.Tensor],
        *,
        ns_dtype: torch.dtype,
        lr: float = 1e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        state_dtype: torch.dtype | None = None,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_eps: float = NS_EPS,
        split_across_ranks: bool = True,
        process_group: Any = None,
        ns_max_batch: int | None | Literal["auto"] = "auto",
    ) -> None:
        muon_list, adamw_list = list(muon_params), list(adamw_params)
        if not muon_list and not adamw_list:
            raise ValueError("MuonAdamW got no parameters")
        for p in muon_list:
            if p.ndim != 2:
                raise ValueError(f"Muon only trains 2-D matrices; got a parameter of shape {tuple(p.shape)}")
        if lr <= 0 or (adamw_lr is not None and adamw_lr <= 0):
            raise ValueError(f"learning rates must be > 0 (lr={lr}, adamw_lr={adamw_lr})")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if not all(0.0 <= b < 1.0 for b in adamw_betas):
            raise ValueError(f"adamw_betas must be in [0, 1), got {adamw_betas}")
        if adamw_eps <= 0 or weight_decay < 0 or adamw_weight_decay < 0:
            raise ValueError("adamw_eps must be > 0 and weight decays >= 0")
        if ns_max_batch not in ("auto", None) and not (isinstance(ns_max_batch, int) and ns_max_batch >= 1):
            raise ValueError(f"ns_max_batch must be 'auto', None or an int >= 1, got {ns_max_batch!r}")
        groups: list[dict[str, Any]] = [
            {
                "params": muon_list,
                "name": "muon",
                "algorithm": "muon",
                "lr": lr,
                "momentum": momentum,
                "nesterov": nesterov,
                "ns_steps": ns_steps,
                "weight_decay": weight_decay,
            },
            {
                "params": adamw_list,
                "name": "adamw",
                "algorithm": "adamw",
                "lr": adamw_lr if adamw_lr is not None else lr,
                "betas": tuple(adamw_betas),
                "eps": adamw_eps,
                "weight_decay": adamw_weight_decay,
            },
        ]
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        #: Read by the precision guard: the dtype this optimizer keeps its state in.
        self.state_dtype = state_dtype
        self.ns_dtype = ns_dtype
        self.ns_coefficients: tuple[float, float, float] = ns_coefficients
        self.ns_eps = ns_eps
        self.split_across_ranks = split_across_ranks
        self.process_group = process_group
        self.ns_max_batch = ns_max_batch

    # ------------------------------------------------------------------ state

    def _zeros_state(self, param: torch.Tensor) -> torch.Tensor:
        dtype = self.state_dtype if self.state_dtype is not None else param.dtype
        return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like :meth:`Optimizer.load_state_dict`, but without casting state to the parameter dtype.

        Torch's loader casts floating-point state to each parameter's dtype, which would round
        fp32 moments of bf16 weights to bf16 on every resume. Here state keeps its saved dtype
        (``state_dtype``) and only moves to the parameter's device, so resume is exact.
        """
        load_state_keeping_dtype(self, state_dict, self.state_dtype)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_step(group)
            elif group["algorithm"] == "adamw":
                self._adamw_step(group)
            else:
                raise ValueError(f"unknown algorithm {group['algorithm']!r} in parameter group {group.get('name')}")
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        bufs = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = self._zeros_state(p)
            bufs.append(_local(state["momentum_buffer"]))
        beta = group["momentum"]
        grads = [_local(p.grad).to(b.dtype) for p, b in zip(params, bufs, strict=True)]
        torch._foreach_mul_(bufs, beta)
        torch._foreach_add_(bufs, grads)

        lr, weight_decay = group["lr"], group["weight_decay"]
        locals_ = [_local(p) for p in params]
        if weight_decay:
            torch._foreach_mul_(locals_, 1 - lr * weight_decay)
        # Same-shape (and same-layout) matrices are orthogonalised together; order is the
        # parameter order, so every rank forms identical batches.
        batches: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(params):
            layout = (cast(Any, p).device_mesh, tuple(cast(Any, p).placements)) if _is_dtensor(p) else None
            batches.setdefault((tuple(p.shape), p.dtype, p.device, layout), []).append(i)
        for (shape, _, _, _), indices in batches.items():
            # Nesterov look-ahead per batch, so only one batch of fp32 updates is alive at a time.
            batch_bufs = [bufs[i] for i in indices]
            updates: Sequence[torch.Tensor] = batch_bufs
            if group["nesterov"]:
                updates = torch._foreach_add([grads[i] for i in indices], batch_bufs, alpha=beta)
            ortho_Nmn = self._orthogonalise([params[i] for i in indices], updates, group)
            del updates
            # Added in the weights' dtype arithmetic straight from ns_dtype (no widened copy).
            torch._foreach_add_(
                [locals_[i] for i in indices], list(ortho_Nmn.unbind(0)), alpha=-lr * update_scale(*shape)
            )

    def _stack(self, updates: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[N, m, n]`` in ``ns_dtype``, cast while copying (one pass instead of stack + cast)."""
        out_Nmn = torch.empty((len(updates), *updates[0].shape), dtype=self.ns_dtype, device=updates[0].device)
        torch._foreach_copy_(list(out_Nmn.unbind(0)), list(updates))
        return out_Nmn

    def _newton_schulz(self, updates_Nmn: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        max_batch = self.ns_max_batch
        if max_batch == "auto":
            # One batched matmul per term is what makes Muon fast on a GPU; on a CPU the batch
            # of large matrices leaves the caches between iterations (bench/optimizer_step.py).
            max_batch = 1 if updates_Nmn.device.type == "cpu" else None
        return newton_schulz(
            updates_Nmn, group["ns_steps"], self.ns_dtype, self.ns_coefficients, self.ns_eps, max_batch=max_batch
        )

    def _orthogonalise(
        self, params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], group: dict[str, Any]
    ) -> torch.Tensor:
        """Orthogonalised updates for one same-shape batch, as ``[N, *local shape]`` in ``ns_dtype``."""
        if _is_dtensor(params[0]):
            return self._orthogonalise_sharded(params, updates, group)
        world = self._replicated_world()
        if world > 1:
            return self._orthogonalise_replicated(updates, group, world)
        return self._newton_schulz(self._stack(updates), group)

    def _replicated_world(self) -> int:
        if not self.split_across_ranks or not dist.is_available() or not dist.is_initialized():
            return 1
        return int(dist.get_world_size(self.process_group))

    def _orthogonalise_replicated(
        self, updates: Sequence[torch.Tensor], group: dict[str, Any], world: int
    ) -> torch.Tensor:
        """DDP: rank r orthogonalises matrices [r·k, (r+1)·k) of the batch; all_gather shares the results."""
        rank = dist.get_rank(self.process_group)
        count = len(updates)
        per_rank = math.ceil(count / world)
        lo, hi = min(rank * per_rank, count), min((rank + 1) * per_rank, count)
        rows, cols = updates[0].shape
        mine_kmn = torch.zeros(per_rank, rows, cols, dtype=self.ns_dtype, device=updates[0].device)
        if hi > lo:
            mine_kmn[: hi - lo] = self._newton_schulz(self._stack(updates[lo:hi]), group)
        gathered_Wkmn = torch.empty(world * per_rank, rows, cols, dtype=self.ns_dtype, device=mine_kmn.device)
        dist.all_gather(list(gathered_Wkmn.chunk(world)), mine_kmn, group=self.process_group)
        return gathered_Wkmn[:count]

    def _orthogonalise_sharded(
        self, params: Sequence[Any], updates: Sequence[torch.Tensor], group: dict[str, Any]
    ) -> torch.Tensor:
        first = params[0]
        mesh, placements = first.device_mesh, tuple(first.placements)
        if mesh.ndim == 1 and placements == (Shard(0),):
            return self._orthogonalise_row_sharded(params, updates, group)
        return self._orthogonalise_gathered(params, updates, group)

    def _orthogonalise_row_sharded(
        self, params: Sequence[Any], updates: Sequence[torch.Tensor], group: dict[str, Any]
    ) -> torch.Tensor:
        """FSDP2 (``Shard(0)``, 1-D mesh): gather each matrix on its owner rank, orthogonalise, scatter back.

        DTensor shards rows like ``torch.chunk``: with c = ⌈m/world⌉ rank r holds rows
        [r·c, min((r+1)·c, m)). Shards are zero-padded to c rows so both exchanges are a single
        ``all_to_all_single`` of equal-sized blocks; padding rows are cut before Newton–Schulz.
        """
        mesh = params[0].device_mesh
        pg = mesh.get_group()
        world, rank = mesh.size(), mesh.get_local_rank()
        rows, cols = params[0].shape
        chunk = math.ceil(rows / world)
        local_rows = max(0, min(chunk, rows - rank * chunk))
        for p, u in zip(params, updates, strict=True):
            if tuple(u.shape) != (local_rows, cols):
                raise RuntimeError(
                    f"unexpected FSDP2 shard of a {tuple(p.shape)} parameter on rank {rank}: local shape "
                    f"{tuple(u.shape)}, expected ({local_rows}, {cols}) from torch.chunk row sharding"
                )
        count = len(updates)
        per_rank = math.ceil(count / world)
        device = updates[0].device
        # send[j] = my shard of matrix j; matrix j belongs to rank j // per_rank.
        send_Jcn = torch.zeros(world * per_rank, chunk, cols, dtype=self.ns_dtype, device=device)
        if local_rows:
            torch._foreach_copy_([send_Jcn[j, :local_rows] for j in range(count)], list(updates))
        recv_Jcn = torch.empty_like(send_Jcn)
        dist.all_to_all_single(recv_Jcn, send_Jcn, group=pg)
        # recv[src, slot] = rank src's shard of my slot-th matrix; stack shards in rank order.
        full_kmn = recv_Jcn.view(world, per_rank, chunk, cols).transpose(0, 1).reshape(per_rank, world * chunk, cols)
        ortho_kmn = self._newton_schulz(full_kmn[:, :rows], group)
        back_kMn = torch.zeros(per_rank, world * chunk, cols, dtype=self.ns_dtype, device=device)
        back_kMn[:, :rows] = ortho_kmn
        send_back = back_kMn.view(per_rank, world, chunk, cols).transpose(0, 1).contiguous()
        recv_back = torch.empty_like(send_back)
        dist.all_to_all_single(recv_back, send_back, group=pg)
        # recv_back[owner, slot] = my shard of matrix owner·per_rank + slot.
        return recv_back.view(world * per_rank, chunk, cols)[:count, :local_rows]

    def _orthogonalise_gathered(
        self, params: Sequence[Any], updates: Sequence[torch.Tensor], group: dict[str, Any]
    ) -> torch.Tensor:
        """Any other DTensor layout: every rank gathers the full matrices and orthogonalises all of them."""
        full = [
            DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
            for p, u in zip(params, updates, strict=True)
        ]
        ortho_Nmn = self._newton_schulz(torch.stack(full), group)
        mesh, placements = params[0].device_mesh, params[0].placements
        replicated = [Replicate()] * mesh.ndim
        # from_local needs the matrix itself, not the transposed view Newton–Schulz returns.
        full_results = [DTensor.from_local(o.contiguous(), mesh, replicated, run_check=False) for o in ortho_Nmn]
        shards = [result.redistribute(mesh, placements).to_local() for result in full_results]
        return torch.stack(shards)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.AdamW`` (foreach), op for op, with moments in ``state_dtype`` (core's)."""
        adamw_step(self.state, [p for p in group["params"] if p.grad is not None], group, self.state_dtype)
