"""Plugin ``ema``: an exponential moving average of every trainable weight (reference.md §4).

ema ← s·ema + (1 − s)·w every ``every`` optimizer steps, over the parameters *and* buffers of the
whole ``run.trainable`` (the denoiser plus every plugin's extra modules, so a SPRINT fusion layer
or a resolution embedder is averaged and used at sampling too, reference.md §7.8). The copy is kept in
the precision policy's ``state_dtype`` (fp32 even when the weights are bf16), sampling and metrics
use it, and it is checkpointed so a resume continues bitwise.

Importing this module is torch-free; the maths is in :mod:`prx_ema.ema`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from prx_core.context import RunContext
    from prx_ema.ema import EmaState

__all__ = [
    "INFO",
    "EMAConfig",
    "prx_after_optimizer_step",
    "prx_before_training",
    "prx_checkpoint_state",
    "prx_configure",
    "prx_sampling_model",
]

#: Key of the EMA weights in checkpoints (``plugins/ema.*``).
CHECKPOINT_KEY = "ema"


@dataclass(frozen=True)
class EMAConfig:
    """The ``[plugins.ema]`` table."""

    #: s in ema ← s·ema + (1 − s)·w. 1.0 freezes the average at its starting weights.
    decay: float = 0.999
    #: Update once every this many optimizer steps (when the completed-step count is a multiple).
    every: int = 10
    #: The average starts from the weights after this many optimizer steps; until then it simply
    #: copies them. 1 (the default): the weights after the first optimizer step, as the reference's
    #: EMA does (reference.md §8). 0: the initial weights, as timm's ModelEmaV2 does.
    start_step: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")


INFO = PluginInfo(
    name="ema",
    summary="EMA of all trainable weights and buffers (fp32), used for sampling/metrics, resumed exactly",
    spec="reference.md §4 (EMA), §7.8",
    config=EMAConfig,
)


def _state(run: RunContext) -> EmaState:
    """The run's EMA (settings only until :meth:`EmaState.ensure` makes the copy)."""

    def create() -> EmaState:
        from prx_ema.ema import EmaState, ema_dtype

        config: EMAConfig = run.plugin_config(INFO.name)
        return EmaState(config.decay, config.every, config.start_step, ema_dtype(run.require("precision")))

    return run.plugin_state(INFO.name, create)


@hookimpl
def prx_configure(run: RunContext) -> None:
    state = _state(run)
    run.logger.info(
        "ema: decay %s every %d step(s), starting at step %d, kept in %s",
        state.decay,
        state.every,
        state.start_step,
        state.dtype,
    )


@hookimpl
def prx_before_training(run: RunContext) -> None:
    # The trainable modules (extras included) are complete and no optimizer step has run: the copy
    # made here holds the initial weights (where the average starts when start_step = 0; otherwise
    # step start_step replaces them by the trained ones). On resume the checkpoint's average
    # overwrites it right after (core's _load).
    _state(run).ensure(run.require("trainable"))


@hookimpl
def prx_after_optimizer_step(run: RunContext, step: int) -> None:
    _state(run).after_optimizer_step(run.require("trainable"), step)


@hookimpl
def prx_sampling_model(run: RunContext) -> torch.nn.Module | None:
    return _state(run).ensure(run.require("trainable"))


@hookimpl
def prx_checkpoint_state(run: RunContext) -> Mapping[str, Any] | None:
    state = _state(run)
    # prx_before_training normally made the copy already; ensure() covers a caller that asks
    # earlier (it needs a module to load a saved average into).
    state.ensure(run.require("trainable"))
    return {CHECKPOINT_KEY: state}
