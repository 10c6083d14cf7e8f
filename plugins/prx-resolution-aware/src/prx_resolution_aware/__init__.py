"""Plugin ``resolution_aware``: tell the denoiser the latent height and width (reference.md §4).

Two modes:

* ``"token"`` (default): two tokens, one embedding H and one embedding W, are prepended to the
  projected text tokens (the image attends to them like to words; the mask gets two True
  entries);
* ``"vec"``: a vector embedding (H, W) is added to the time embedding, so every block's adaLN
  modulation sees it. The maths and parameter names are those of diffusers'
  ``PRXResolutionEmbedder`` (``model.resolution_embeds = true``).

Both go through core's conditioning seam: the module is built by ``prx_build_modules`` (so it is
trained, checkpointed and averaged by EMA) and the seam reads it from ``ctx.extras``, so sampling
with EMA weights uses the EMA copy of the embedder too (reference.md §7.8).

Importing this module is torch-free; the modules are in :mod:`prx_resolution_aware.embedder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prx_core import hookimpl
from prx_core.config import RecipeError
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from prx_core.context import RunContext

__all__ = ["INFO", "NAME", "ResolutionAwareConfig", "prx_build_modules", "prx_configure"]

#: Plugin name, and the key of its module in ``run.trainable.extras`` / ``ctx.extras``.
NAME = "resolution_aware"


@dataclass(frozen=True)
class ResolutionAwareConfig:
    """The ``[plugins.resolution_aware]`` table."""

    #: "token": two tokens prepended to the text keys; "vec": a vector added to the time embedding.
    mode: Literal["token", "vec"] = "token"
    #: Longest period of the sinusoidal embedding of H and W (diffusers uses the model's
    #: ``time_max_period``, 10000 by default).
    max_period: int = 10000

    def __post_init__(self) -> None:
        if self.max_period < 2:
            raise ValueError(f"max_period must be >= 2, got {self.max_period}")


INFO = PluginInfo(
    name=NAME,
    summary="Conditions on the latent H and W: two text tokens (mode token) or a time-vector term (mode vec)",
    spec="reference.md §4 (resolution-aware), §7.8",
    config=ResolutionAwareConfig,
)


@hookimpl
def prx_configure(run: RunContext) -> None:
    from prx_resolution_aware.embedder import ResolutionSeam

    config: ResolutionAwareConfig = run.plugin_config(NAME)
    if config.mode == "vec" and run.recipe.model.resolution_embeds:
        raise RecipeError(
            f"recipe '{run.recipe.name}': plugins.resolution_aware mode 'vec' adds the same resolution vector "
            "as model.resolution_embeds = true; the two would be summed. Set model.resolution_embeds = false "
            "or use mode 'token'"
        )
    run.add_conditioning(NAME, ResolutionSeam(config.mode))


@hookimpl
def prx_build_modules(run: RunContext) -> Mapping[str, torch.nn.Module] | None:
    from prx_resolution_aware.embedder import build_embedder

    config: ResolutionAwareConfig = run.plugin_config(NAME)
    module = build_embedder(config.mode, run.recipe.model.hidden_size, config.max_period)
    # Weights in the dtype the precision policy trains in (its guard checks every parameter).
    return {NAME: module.to(device=run.device, dtype=run.require("precision").param_dtype)}
