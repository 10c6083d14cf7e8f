"""Objective ``x_prediction``: the denoiser outputs the clean sample x̂0 (JiT, reference.md §2).

Training and sampling stay on core's rectified-flow path x_t = (1 − t)·x0 + t·ε; only what the
network predicts changes. Prediction and target are both turned into velocities with
v = (x_t − x) / max(t, t_clamp) before the MSE, as in JiT (arXiv 2511.13720).

Importing this module is torch-free (``prx-run plugins`` and recipe checks import it); the
objective itself lives in :mod:`prx_x_prediction.objective` and is imported by the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_x_prediction.objective import XPrediction

__all__ = ["INFO", "XPredictionConfig", "prx_register_objectives"]

INFO = PluginInfo(
    name="x_prediction",
    summary="Objective: the model predicts x̂0 (JiT); loss on velocities (x_t − x)/max(t, 0.05)",
    spec="reference.md §2 (x-prediction)",
    paper="https://arxiv.org/abs/2511.13720",
)


@dataclass(frozen=True)
class XPredictionConfig:
    """The ``[objective]`` table when ``use = "x_prediction"``.

    The first four fields mean exactly what they mean for core's ``flow_matching``; they are
    spelled out rather than inherited so that a field core adds later cannot be silently accepted
    and ignored here.
    """

    #: Timestep shift s (reference.md §2): 1.0 for latent recipes, 3.0 for pixel (JiT) recipes.
    shift: float = 1.0
    #: Probability of replacing a logit-normal draw by an unshifted uniform one.
    uniform_prob: float = 0.1
    t_min: float = 1e-3
    #: Probability of training a sample on the empty prompt (enables classifier-free guidance).
    caption_dropout: float = 0.1
    #: Lower bound on t in the x̂0 → velocity conversion, 1/t would blow up near the data (JiT's t_eps).
    t_clamp: float = 0.05

    def __post_init__(self) -> None:
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        for name in ("uniform_prob", "caption_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must be in [0, 1), got {self.t_min}")
        if not 0.0 < self.t_clamp <= 1.0:
            raise ValueError(f"t_clamp must be in (0, 1], got {self.t_clamp}")


def _build(config: XPredictionConfig, run: Any) -> XPrediction:
    from prx_x_prediction.objective import XPrediction

    return XPrediction(config)


@hookimpl
def prx_register_objectives(registry: Any) -> None:
    registry.register("x_prediction", _build, XPredictionConfig)
