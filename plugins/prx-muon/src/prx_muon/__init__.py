"""Optimizer ``muon``: Muon on every 2-D weight inside the transformer blocks, AdamW on the rest (reference.md §4).

Muon orthogonalises the Nesterov momentum of each weight matrix with a Newton–Schulz quintic
(Keller Jordan, https://kellerjordan.github.io/posts/muon/) and scales the update by
0.2·√max(m, n) so the AdamW learning rate carries over (Moonshot, arXiv 2502.16982). Embedders,
the final layer, norms, biases and every module other plugins add (``extras.*``) use AdamW.
Runs on one device, under DDP and under FSDP2 (reference.md §7.7); see :mod:`prx_muon.optimizer`.

Importing this module is torch-free; torch loads in the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_muon.optimizer import MuonAdamW

__all__ = ["INFO", "MuonConfig", "build_optimizer", "prx_register_optimizers"]

INFO = PluginInfo(
    name="muon",
    summary="Muon (Nesterov, batched Newton-Schulz, 0.2*sqrt(max(m,n))) on block matrices + AdamW on the rest",
    spec="reference.md §4 (Muon), §7.7",
    paper="https://arxiv.org/abs/2502.16982",
)


@dataclass(frozen=True)
class MuonConfig:
    """The ``[optimizer]`` table when ``use = "muon"``."""

    #: Learning rate of the Muon group (and of the AdamW group unless ``adamw_lr`` is set).
    lr: float = 1e-4
    momentum: float = 0.95
    nesterov: bool = True
    #: Newton–Schulz iterations of the quintic (3.4445, −4.7750, 2.0315).
    ns_steps: int = 5
    #: Dtype Newton–Schulz computes in: an algorithm choice of Muon, not a storage dtype.
    ns_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    #: Decoupled weight decay of the Muon group: W ← W·(1 − lr·wd).
    weight_decay: float = 0.0
    #: Learning rate of the AdamW group; unset: ``lr`` (reference.md §4: 1e-4 for both groups).
    adamw_lr: float | None = None
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    #: The reference's Muon configuration gives its Adam group eps 1e-8 (reference.md §8), not the
    #: AdamW baseline's 1e-15; with it this group's update is bitwise the reference's.
    adamw_eps: float = 1e-8
    adamw_weight_decay: float = 0.0
    #: fnmatch patterns over ``run.trainable`` parameter names; matching 2-D weights use Muon.
    muon_patterns: tuple[str, ...] = ("model.blocks.*",)
    #: Names matching these use AdamW even if they match ``muon_patterns``.
    exclude_patterns: tuple[str, ...] = ()
    #: Under DDP, split the Newton–Schulz work across ranks (each does 1/world of it).
    split_across_ranks: bool = True
    #: Matrices per batched Newton–Schulz matmul: ``"auto"`` is every same-shape matrix at once on
    #: a GPU and one at a time on a CPU (where batching spills the caches and is slower).
    ns_max_batch: int | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.adamw_lr is not None and self.adamw_lr <= 0:
            raise ValueError(f"adamw_lr must be > 0, got {self.adamw_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 1 <= self.ns_steps <= 20:
            raise ValueError(f"ns_steps must be in [1, 20], got {self.ns_steps}")
        if self.ns_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"ns_dtype must be 'bfloat16' or 'float32', got {self.ns_dtype!r}")
        if not all(0.0 <= b < 1.0 for b in self.adamw_betas):
            raise ValueError(f"adamw_betas must be in [0, 1), got {self.adamw_betas}")
        if self.adamw_eps <= 0:
            raise ValueError(f"adamw_eps must be > 0, got {self.adamw_eps}")
        if self.weight_decay < 0 or self.adamw_weight_decay < 0:
            raise ValueError("weight_decay and adamw_weight_decay must be >= 0")
        if self.ns_max_batch != "auto" and not (isinstance(self.ns_max_batch, int) and self.ns_max_batch >= 1):
            raise ValueError(f"ns_max_batch must be 'auto' or an integer >= 1, got {self.ns_max_batch!r}")


def build_optimizer(named_parameters: Any, config: MuonConfig, state_dtype: Any = None) -> MuonAdamW:
    """``MuonAdamW`` over ``(name, parameter)`` pairs, grouped by ``config``'s patterns.

    Parameters with ``requires_grad=False`` are left out. ``state_dtype`` comes from the
    precision policy (``run.precision.state_dtype``); ``None`` keeps state in each parameter's dtype.
    """
    import torch

    from prx_muon.grouping import split_parameters
    from prx_muon.optimizer import MuonAdamW

    trainable = [(n, p) for n, p in named_parameters if p.requires_grad]
    muon, adamw = split_parameters(trainable, config.muon_patterns, config.exclude_patterns)
    return MuonAdamW(
        [p for _, p in muon],
        [p for _, p in adamw],
        ns_dtype=getattr(torch, config.ns_dtype),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        ns_steps=config.ns_steps,
        weight_decay=config.weight_decay,
        adamw_lr=config.adamw_lr,
        adamw_betas=config.adamw_betas,
        adamw_eps=config.adamw_eps,
        adamw_weight_decay=config.adamw_weight_decay,
        state_dtype=state_dtype,
        split_across_ranks=config.split_across_ranks,
        ns_max_batch=config.ns_max_batch,
    )


def _build(config: MuonConfig, run: Any) -> MuonAdamW:
    precision = run.require("precision")
    return build_optimizer(run.require("trainable").named_parameters(), config, precision.state_dtype)


@hookimpl
def prx_register_optimizers(registry: Any) -> None:
    registry.register("muon", _build, MuonConfig)
