"""The EMA copy and its update, as plain functions on modules and tensor lists."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Protocol

import torch

#: Elements converted at once when the weights are narrower than the EMA (256 MiB of fp32).
_CHUNK_ELEMENTS = 1 << 26


class _HasStateDtype(Protocol):
    state_dtype: torch.dtype


def ema_dtype(precision: _HasStateDtype) -> torch.dtype:
    """The dtype the average is kept in: the precision policy's ``state_dtype``, never hard-coded.

    That is fp32 in every shipped policy, bf16 weights included, and it has to be (reference.md §4): with
    s = 0.999 each update moves the average by 0.1% of its gap to the weights, below bf16's
    relative resolution of 2⁻⁸ ≈ 0.4%, so a bf16 average would stop moving.
    """
    return precision.state_dtype


def make_ema_copy(live: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen deep copy of ``live`` whose floating-point parameters and buffers are in ``dtype``."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in live.parameters()):
        # A deep copy of an FSDP2 module would share the original's sharding hooks and state.
        raise NotImplementedError(
            "ema: the trainable modules are sharded (train.parallel = 'fsdp2'); this EMA averages a full "
            "copy and supports single-process and DDP runs only. Use train.parallel = 'ddp'"
        )
    ema = copy.deepcopy(live)
    ema.requires_grad_(False)
    for param in ema.parameters():
        param.grad = None
    if any(t.is_floating_point() and t.dtype != dtype for t in (*ema.parameters(), *ema.buffers())):
        # nn.Module.to casts floating-point tensors only; integer buffers keep their dtype.
        ema.to(dtype=dtype)
    return ema.train(False)  # never trained; generate() sets the mode it needs


def paired_tensors(
    ema: torch.nn.Module, live: torch.nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(ema floats, live floats, ema others, live others): parameters and buffers matched by name.

    Floating-point tensors are averaged; other buffers (integer counters) are copied. Live
    tensors are returned detached and in their own dtype (possibly narrower than the EMA's).
    """
    ema_named = dict(ema.named_parameters()) | dict(ema.named_buffers())
    live_named = dict(live.named_parameters()) | dict(live.named_buffers())
    if ema_named.keys() != live_named.keys():
        missing = sorted(ema_named.keys() ^ live_named.keys())
        raise RuntimeError(f"ema: the EMA copy and the trained modules differ in tensors {missing[:5]}")
    ema_f, live_f, ema_o, live_o = [], [], [], []
    for name, ema_t in ema_named.items():
        live_t = live_named[name].detach()
        if ema_t.shape != live_t.shape:
            raise RuntimeError(f"ema: '{name}' is {tuple(ema_t.shape)} in the EMA but {tuple(live_t.shape)} live")
        if ema_t.is_floating_point():
            ema_f.append(ema_t)
            live_f.append(live_t)
        else:
            ema_o.append(ema_t)
            live_o.append(live_t)
    return ema_f, live_f, ema_o, live_o


@torch.no_grad()
def ema_update_(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·live, for every parameter and floating buffer, in place.

    Written as lerp(ema, live, 1 − decay) = ema + (1 − decay)·(live − ema): the same value, one
    fused multi-tensor kernel, and exactly ``ema`` when decay = 1.
    """
    ema_f, live_f, ema_o, live_o = paired_tensors(ema, live)
    for ema_chunk, live_chunk in _same_dtype_chunks(ema_f, live_f):
        torch._foreach_lerp_(ema_chunk, live_chunk, 1.0 - decay)
    for ema_t, live_t in zip(ema_o, live_o, strict=True):
        ema_t.copy_(live_t)


def _same_dtype_chunks(
    ema_f: list[torch.Tensor], live_f: list[torch.Tensor]
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The pairs as lists ``_foreach_lerp_`` accepts: it needs ``live`` in the EMA's dtype.

    When the dtypes already agree this is one chunk and no copy. Otherwise (bf16 weights, fp32
    EMA) the live tensors are converted lazily, a bounded number of elements at a time, so the
    update never holds a second full-size copy of the model.
    """
    if all(e.dtype == w.dtype for e, w in zip(ema_f, live_f, strict=True)):
        if ema_f:
            yield ema_f, live_f
        return
    start, size = 0, 0
    for i, ema_t in enumerate(ema_f):
        size += ema_t.numel()
        if size >= _CHUNK_ELEMENTS or i == len(ema_f) - 1:
            ema_chunk = ema_f[start : i + 1]
            yield ema_chunk, [w.to(e.dtype) for e, w in zip(ema_chunk, live_f[start : i + 1], strict=True)]
            start, size = i + 1, 0


@torch.no_grad()
def ema_copy_(ema: torch.nn.Module, live: torch.nn.Module) -> None:
    """ema ← live (before ``start_step``)."""
    ema_f, live_f, ema_o, live_o = paired_tensors(ema, live)
    if ema_f or ema_o:
        # copy_ converts dtypes itself, so no chunking is needed here.
        torch._foreach_copy_([*ema_f, *ema_o], [*live_f, *live_o])


class EmaState:
    """One run's EMA: the settings and the copy, made from the trained modules on first use.

    Also the checkpoint object (``state_dict``/``load_state_dict``) for the run's checkpoints.
    """

    def __init__(self, decay: float, every: int, start_step: int, dtype: torch.dtype) -> None:
        self.decay = decay
        self.every = every
        self.start_step = start_step
        self.dtype = dtype
        self.modules: torch.nn.Module | None = None

    def ensure(self, live: torch.nn.Module) -> torch.nn.Module:
        """The EMA modules, copied from ``live`` the first time (same structure, ``dtype``)."""
        if self.modules is None:
            self.modules = make_ema_copy(live, self.dtype)
        return self.modules

    def after_optimizer_step(self, live: torch.nn.Module, step: int) -> None:
        """``step`` optimizer steps are complete: copy until ``start_step``, then average every ``every``.

        With ``start_step = 1`` the average is the weights after step 1, then moves at steps
        ``every``, 2·``every``, …: the reference's EMA (composer's, with ``ema_start = 0ba``),
        which copies the weights at the end of the first batch and averages at multiples of the
        interval.
        """
        ema = self.ensure(live)
        if step <= self.start_step:
            ema_copy_(ema, live)
        elif step % self.every == 0:
            ema_update_(ema, live, self.decay)

    def _modules(self) -> torch.nn.Module:
        if self.modules is None:
            raise RuntimeError("ema: the EMA copy does not exist yet (no trained modules seen)")
        return self.modules

    def state_dict(self) -> dict[str, Any]:
        return dict(self._modules().state_dict())

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """``strict=False`` (a new ``[[stages]]`` stage that adds or drops plugin modules) keeps the
        averages of the modules both have; the others start from the live weights."""
        self._modules().load_state_dict(state, strict=strict)
