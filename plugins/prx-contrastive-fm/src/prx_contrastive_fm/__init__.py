"""Loss term ``contrastive_fm``: contrastive flow matching (ΔFM, arXiv 2506.05350, reference.md §4).

Adds −λ·MSE(v̂, roll(v_target, 1)) to the loss: each sample's predicted velocity is pushed away
from the target velocity of its neighbour in the batch, which discourages the conditional flows
of different samples from collapsing onto a shared average.

The comparison happens in velocity space so the term works with any objective: the prediction
goes through ``run.objective.velocity`` (the identity for ``flow_matching``, (x_t − x̂0)/max(t,
0.05) for ``x_prediction``), and the rolled target is the objective's own target velocity of the
neighbour, as the reference rolls its target tensor (reference.md §8): ε − x0 for
``flow_matching``, (x_t − x0)/max(t, t_clamp) with the neighbour's x_t and t for an objective that
exposes a public ``t_clamp`` (``x_prediction``).

Importing this module is torch-free; the maths is in :mod:`prx_contrastive_fm.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prx_core import hookimpl
from prx_core.hookspecs import LossTerm, PluginInfo

if TYPE_CHECKING:
    from prx_core.context import StepContext

__all__ = ["INFO", "ContrastiveFMConfig", "prx_loss_terms"]

#: Name of the loss term (logged as ``loss/contrastive_fm``).
TERM = "contrastive_fm"


@dataclass(frozen=True)
class ContrastiveFMConfig:
    """The ``[plugins.contrastive_fm]`` table."""

    #: λ: the term enters the loss as −λ·MSE(v̂, rolled target). 0.05 in the PRX ablation.
    weight: float = 0.05

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight is λ ≥ 0 (the sign is applied by the plugin), got {self.weight}")


INFO = PluginInfo(
    name="contrastive_fm",
    summary="Loss term: −λ·MSE(predicted velocity, target velocity of the next sample in the batch)",
    spec="reference.md §4 (contrastive flow matching)",
    paper="https://arxiv.org/abs/2506.05350",
    config=ContrastiveFMConfig,
)


@hookimpl
def prx_loss_terms(step: StepContext) -> list[LossTerm] | None:
    from prx_contrastive_fm.loss import contrastive_mse

    config: ContrastiveFMConfig = step.run.plugin_config(INFO.name)
    if step.prediction_BCHW is None:
        raise RuntimeError("contrastive_fm: the step has no prediction; loss terms run after the denoiser forward")
    value = contrastive_mse(
        step.run.require("objective"),
        step.prediction_BCHW,
        step.x0_BCHW,
        step.noise_BCHW,
        step.x_t_BCHW,
        step.t_B,
    )
    if value is None:  # a batch of one sample has no other sample to contrast with
        return None
    return [LossTerm(TERM, -config.weight, value)]
