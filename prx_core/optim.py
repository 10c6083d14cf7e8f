"""AdamW that keeps its moments in the precision policy's ``state_dtype`` for low-precision weights.

``torch.optim.AdamW`` creates its moments with ``zeros_like(param)``, so on bf16-stored weights
(the ``bf16_weights`` ablation) its moments would be bf16 too, which is not what that policy
promises (fp32 optimizer state, reference.md §4). :class:`StateDtypeAdamW` is the same algorithm with the
moments in ``state_dtype``: each step reads the weight, forms the whole update in ``state_dtype``
(weight decay, moments, bias correction, the addcdiv) and writes the result back rounded once into
the weight's dtype. There is deliberately **no fp32 master copy** of the weights: the ablation
measures what bf16 *storage* does, and a master copy would hide exactly that.

The arithmetic follows ``torch.optim.AdamW``'s foreach implementation operation for operation, so
a step equals torch's AdamW applied to an fp32 copy of the weights, rounded to the weight dtype.
The builtin ``adamw`` optimizer uses this class only when some parameter is stored in a dtype other
than ``state_dtype``; fp32 weights keep the plain fused/foreach ``torch.optim.AdamW``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch.optim import Optimizer

__all__ = ["StateDtypeAdamW", "adamw_step", "load_state_keeping_dtype"]

#: Elements per foreach call: bounds the transient ``state_dtype`` copies of weights and the
#: denominator (2 × 4 bytes × this = 512 MiB at fp32) whatever the model size.
BUCKET_ELEMENTS = 1 << 26


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank holds: a DTensor's local shard (a view, so in-place writes go through)."""
    to_local = getattr(tensor, "to_local", None)
    return cast(torch.Tensor, to_local()) if to_local is not None else tensor


class StateDtypeAdamW(Optimizer):
    """Decoupled-weight-decay Adam with moments in ``state_dtype`` whatever the weights' dtype.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (``state_dtype``). The
    precision guard reads :attr:`state_dtype` to predict the dtype of state not created yet.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        state_dtype: torch.dtype,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bucket_elements: int = BUCKET_ELEMENTS,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"eps must be > 0 and weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        if not state_dtype.is_floating_point:
            raise ValueError(f"state_dtype must be a floating-point dtype, got {state_dtype}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        #: Read by the precision guard: the dtype this optimizer keeps its moments in.
        self.state_dtype = state_dtype
        self.bucket_elements = bucket_elements

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like :meth:`Optimizer.load_state_dict`, without casting the moments to the weight dtype.

        Torch's loader casts floating-point state to each parameter's dtype, which would round the
        fp32 moments of bf16 weights to bf16 on every resume; here they keep ``state_dtype`` and
        only move to the parameter's device, so a resume is exact.
        """
        load_state_keeping_dtype(self, state_dict, self.state_dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            adamw_step(self.state, params, group, self.state_dtype, self.bucket_elements)
        return loss


def adamw_step(
    state: Any,
    params: list[torch.Tensor],
    group: Mapping[str, Any],
    state_dtype: torch.dtype | None,
    bucket_elements: int = BUCKET_ELEMENTS,
) -> None:
    """One AdamW step for ``params`` (all with gradients), in buckets of ``bucket_elements``.

    ``state`` is the optimizer's per-parameter state; moments are created in ``state_dtype``
    (None: each parameter's dtype, as ``torch.optim`` does). Shared by :class:`StateDtypeAdamW`
    and plugin optimizers with an AdamW group (Muon's), so both round bf16 weights once.
    """
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if cast(torch.Tensor, p.grad).is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        bucket.append(p)
        size += p.numel()
        if size >= bucket_elements:
            _adamw_update(state, bucket, group, state_dtype)
            bucket, size = [], 0
    if bucket:
        _adamw_update(state, bucket, group, state_dtype)


def _adamw_update(
    state: Any, params: list[torch.Tensor], group: Mapping[str, Any], state_dtype: torch.dtype | None
) -> None:
    """``torch.optim.AdamW``'s foreach arithmetic, in the moments' dtype.

    Weights stored in that dtype are updated in place, op for op as torch does (bitwise equal).
    Narrower weights (bf16 under ``bf16_weights``) are read into a transient copy in the moments'
    dtype, updated there (decay, moments, bias correction, addcdiv) and rounded back once.
    """
    beta1, beta2 = group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for p in params:
        param_state = state[p]
        if not param_state:
            dtype = state_dtype if state_dtype is not None else p.dtype
            param_state["step"] = 0
            param_state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            param_state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        param_state["step"] += 1
        steps.append(param_state["step"])
        exp_avgs.append(_local(param_state["exp_avg"]))
        exp_avg_sqs.append(_local(param_state["exp_avg_sq"]))
    stored = [_local(p) for p in params]
    # Transient copies only where the dtypes differ (``to`` returns the tensor itself otherwise);
    # nothing is kept between steps: no master weights, see the module doc.
    weights = [w.to(m.dtype) for w, m in zip(stored, exp_avgs, strict=True)]
    grads = [_local(cast(torch.Tensor, p.grad)).to(m.dtype) for p, m in zip(params, exp_avgs, strict=True)]
    if weight_decay:
        torch._foreach_mul_(weights, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads
    step_size = [-(lr / (1 - beta1**s)) for s in steps]
    bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(weights, exp_avgs, denom, step_size)
    del denom
    # The one rounding into the storage dtype (round to nearest even), where there is one.
    narrowed = [(s, w) for s, w in zip(stored, weights, strict=True) if w is not s]
    if narrowed:
        torch._foreach_copy_([s for s, _ in narrowed], [w for _, w in narrowed])


def load_state_keeping_dtype(
    optimizer: torch.optim.Optimizer, state_dict: dict[str, Any], state_dtype: torch.dtype | None
) -> None:
    """``optimizer.load_state_dict`` without torch's cast of floating-point state to the parameter dtype.

    That cast would round fp32 moments of bf16 weights to bf16 on every resume. Floating-point
    state takes ``state_dtype`` (None: its saved dtype) and only moves to its parameter's device,
    so a resume is exact. Shared by every optimizer that keeps state in another dtype than its weights.
    """
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    by_id: dict[Any, torch.Tensor] = {}
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        by_id.update(zip(saved_group["params"], group["params"], strict=True))
    for param_id, values in saved_state.items():
        if param_id not in by_id:
            raise ValueError(f"optimizer state for unknown parameter index {param_id}")
        param = by_id[param_id]
        restored: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                dtype = state_dtype if value.is_floating_point() and state_dtype is not None else value.dtype
                value = value.to(device=param.device, dtype=dtype)
            restored[key] = value
        optimizer.state[param] = restored
