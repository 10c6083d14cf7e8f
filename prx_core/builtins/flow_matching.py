"""Objective ``flow_matching``: rectified flow with a velocity target (reference.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class FlowMatchingConfig:
    #: Timestep shift s (reference.md §2): 1.0 for latent recipes, 3.0 for pixel (JiT) recipes.
    shift: float = 1.0
    #: Probability of replacing a logit-normal draw by an unshifted uniform one.
    uniform_prob: float = 0.1
    t_min: float = 1e-3
    #: Probability of training a sample on the empty prompt (enables classifier-free guidance).
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError("shift must be > 0")
        for name in ("uniform_prob", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError("t_min must be in [0, 1)")


INFO = PluginInfo(
    name="flow_matching",
    summary="Rectified-flow objective: velocity target, logit-normal t with shift, caption dropout",
    spec="reference.md §2",
)


def _build(config: FlowMatchingConfig, run: Any) -> Any:
    from prx_core.objectives import FlowMatching

    return FlowMatching(config)


@hookimpl
def prx_register_objectives(registry: Any) -> None:
    registry.register("flow_matching", _build, FlowMatchingConfig)
