"""Optimizer ``adamw`` with the PRX baseline values (reference.md §3).

Warm-up and the constant schedule are core's ``[schedule]`` section and gradient clipping is
``train.grad_clip``, since every optimizer shares them.

Optimizer state follows the precision policy's ``state_dtype``. When every trainable weight is
stored in that dtype (fp32 under ``bf16_mixed`` and ``fp32``) this is plain ``torch.optim.AdamW``
(fused on CUDA, foreach elsewhere). When weights are stored narrower (``bf16_weights``), torch's
AdamW would keep bf16 moments, so :class:`prx_core.optim.StateDtypeAdamW` runs instead: fp32
moments, the update formed in fp32 and rounded once into the bf16 weight, no fp32 master copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    #: PRX uses a tiny eps so that Adam's update stays sign-like for small second moments.
    eps: float = 1e-15
    weight_decay: float = 0.0
    #: None: fused kernels on CUDA, foreach elsewhere (both avoid per-parameter Python loops).
    #: Applies to weights stored in the policy's state dtype (see the module docstring).
    fused: bool | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must be in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError("eps must be > 0 and weight_decay >= 0")


INFO = PluginInfo(name="adamw", summary="AdamW, lr 1e-4, betas (0.9, 0.95), eps 1e-15, wd 0", spec="reference.md §3")


def _build(config: AdamWConfig, run: Any) -> Any:
    import torch

    params = [p for p in run.require("trainable").parameters() if p.requires_grad]
    state_dtype = run.require("precision").state_dtype
    groups = [{"params": params, "name": "all"}]
    if any(p.dtype != state_dtype for p in params):
        from prx_core.optim import StateDtypeAdamW

        return StateDtypeAdamW(
            groups,
            state_dtype=state_dtype,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )
    fused = config.fused if config.fused is not None else run.device.type == "cuda"
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
        foreach=None if fused else True,
    )


@hookimpl
def prx_register_optimizers(registry: Any) -> None:
    registry.register("adamw", _build, AdamWConfig)
