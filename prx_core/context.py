"""What hooks receive: the run (built once) and the step (built every micro-step)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from prx_core.keys import Stash

T = TypeVar("T")

if TYPE_CHECKING:
    from prx_core.denoiser import TrainableModules
    from prx_core.recipe import Recipe
    from prx_core.slots import (
        ConditioningSeam,
        DataSource,
        LatentSpace,
        Objective,
        PrecisionPolicy,
        TextEncoder,
        TokenRouter,
        Tracker,
    )


@dataclass
class RunContext:
    """The run: recipe, device, the built slot objects and the trainable modules.

    Slots are filled in a fixed order (precision first, since every other builder asks it for
    dtypes); ``trainable`` exists from ``prx_build_modules`` on.
    """

    recipe: Recipe
    device: torch.device
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("prx"))
    precision: PrecisionPolicy | None = None
    data: DataSource | None = None
    latent_space: LatentSpace | None = None
    text_encoder: TextEncoder | None = None
    objective: Objective | None = None
    router: TokenRouter | None = None
    tracker: Tracker | None = None
    trainable: TrainableModules | None = None
    captures: set[int] = field(default_factory=set)
    conditioning: dict[str, ConditioningSeam] = field(default_factory=dict)
    plugin_states: dict[str, Any] = field(default_factory=dict)

    def plugin_config(self, name: str) -> Any:
        """The validated ``[plugins.<name>]`` config of an enabled plugin."""
        try:
            return self.recipe.plugins[name]
        except KeyError:
            raise KeyError(f"plugin '{name}' is not enabled in recipe '{self.recipe.name}'") from None

    def capture_after_block(self, index: int) -> None:
        """Ask the block loop to publish block ``index``'s output tokens under CAPTURED_FEATURES."""
        depth = self.recipe.model.depth
        if not 0 <= index < depth:
            raise ValueError(f"cannot capture block {index}: the model has blocks 0..{depth - 1}")
        self.captures.add(index)

    def plugin_state(self, name: str, create: Callable[[], T]) -> T:
        """The per-run state object of plugin ``name``, made by ``create`` on first use.

        It lives exactly as long as the run, so plugins keep frozen teachers, EMA copies and
        similar here instead of in module globals that would leak between runs and tests.
        """
        if name not in self.plugin_states:
            self.plugin_states[name] = create()
        state: T = self.plugin_states[name]
        return state

    def store_weights_in(self, module: torch.nn.Module, dtype: torch.dtype, *, owner: str, reason: str) -> None:
        """Store a plugin module's weights in ``dtype`` instead of the policy's ``param_dtype``.

        The one sanctioned way for a plugin (``owner``) to keep a trainable module of its own in
        another dtype (REPA's bf16 projector, reference.md §8); call it from ``prx_build_modules``
        on the module about to be returned. The module is cast and marked, the choice is logged,
        and the precision guard then checks that module against ``dtype`` (and everything else
        against ``param_dtype``, as before). Optimizer state stays in ``state_dtype``. When
        ``dtype`` already is ``param_dtype`` nothing is declared: there is no exception to make.
        """
        from prx_core.precision import declare_storage_dtype

        precision = self.require("precision")
        if dtype == precision.param_dtype:
            return
        declare_storage_dtype(module, dtype, owner=owner, reason=reason)
        self.logger.info(
            "precision: plugin '%s' stores its module's weights in %s, not in %s (precision policy '%s'): %s; "
            "its optimizer state stays %s",
            owner,
            dtype,
            precision.param_dtype,
            precision.name,
            reason,
            precision.state_dtype,
        )

    def add_conditioning(self, name: str, seam: ConditioningSeam) -> None:
        """Register a conditioning seam (runs before the blocks; seams apply in name order)."""
        if name in self.conditioning:
            raise ValueError(f"a conditioning seam named '{name}' is already registered")
        self.conditioning[name] = seam

    def conditioning_seams(self) -> list[ConditioningSeam]:
        return [self.conditioning[name] for name in sorted(self.conditioning)]

    def require(self, what: str) -> Any:
        """A built slot object, with a clear error when it is asked for too early."""
        value = getattr(self, what)
        if value is None:
            raise RuntimeError(f"run.{what} is not built yet at this point of setup")
        return value


@dataclass
class ForwardContext:
    """Per-forward state for block-loop seams (routers, conditioning, capture).

    ``extras`` are the plugin modules *of the weights being run*: the trained ones in a training
    step, the EMA copy when sampling with EMA. Seams must take their modules from here, never
    from ``run.trainable``, so that sampling with EMA weights uses EMA plugin modules too
    (the reference got this wrong for SPRINT and resolution-aware, reference.md §7.8).
    """

    stash: Stash
    generator: torch.Generator | None
    training: bool
    extras: Mapping[str, torch.nn.Module] | torch.nn.ModuleDict = field(default_factory=dict)


@dataclass
class StepContext:
    """One micro-step, as loss-term plugins see it. Tensors carry their shapes in their names."""

    run: RunContext
    step: int
    micro_step: int
    #: The clean images in [0, 1]; None when the batch came as precomputed encodings (no pixels).
    images_BCHW: torch.Tensor | None
    x0_BCHW: torch.Tensor
    noise_BCHW: torch.Tensor
    t_B: torch.Tensor
    x_t_BCHW: torch.Tensor
    text_BLD: torch.Tensor
    mask_BL: torch.Tensor
    stash: Stash
    generator: torch.Generator
    prediction_BCHW: torch.Tensor | None = None
    #: Plugin targets precomputed by ``prx_precompute_features`` (keys namespaced by plugin), on
    #: the run's device; empty when the batch came from pixels.
    precomputed: dict[str, torch.Tensor] = field(default_factory=dict)
