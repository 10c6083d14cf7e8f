"""Token router ``sprint``: a sparse block span fused with its dense input (SPRINT, reference.md §4).

SPRINT (sparse–dense residual fusion, arXiv 2510.21986) routes a large fraction p of each sample's
image tokens (0.75) around blocks ``start..end`` like TREAD, but instead of passing the routed
tokens through unchanged it rebuilds the full sequence after ``end`` as

    out = fuse([dense ; sparse filled with a learnable mask token at routed positions])

where ``dense`` is the input of block ``start`` and ``fuse`` a Linear 2H → H with a bias, at
PyTorch's default initialisation like the public code (reference.md §8); ``fusion_init =
"identity"`` starts it as the span output instead. The fusion module (the Linear and the mask
token) is built through ``prx_build_modules``, so it is optimised, EMA-averaged and checkpointed
with the model, and the block loop takes it from ``ctx.extras``, so sampling with EMA weights uses
the EMA fusion (reference.md §7.8). The fusion also runs at evaluation, where nothing is routed
(p = 0).

Importing this module is torch-free; the router is in :mod:`prx_sprint.router`, the fusion in
:mod:`prx_sprint.fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    import torch

    from prx_core.context import RunContext
    from prx_sprint.router import SprintRouter

__all__ = ["INFO", "prx_check_recipe", "SprintConfig", "prx_build_modules", "prx_register_token_routers"]

INFO = PluginInfo(
    name="sprint",
    summary="Token router: p = 0.75 of image tokens skip blocks start..end; after end a Linear 2H→H fuses "
    "the dense input with the sparse output (mask token at routed positions) (SPRINT)",
    spec="reference.md §4 (SPRINT), §7.8",
    paper="https://arxiv.org/abs/2510.21986",
)


@dataclass(frozen=True)
class SprintConfig:
    """The ``[router]`` table when ``use = "sprint"``."""

    #: First routed block (0-based); its input is the dense half of the fusion. reference.md §4: 2.
    start: int = 2
    #: Last routed block, inclusive (0-based; must be < model.depth). reference.md §4: 12 (of 16).
    end: int = 12
    #: p, the fraction of each sample's image tokens that skips the span: round(p·N) of N tokens
    #: (Python's round, halves to even; at least 1 when p > 0) skip it, the rest stay.
    ratio: float = 0.75
    #: Route only in training forwards; evaluation runs every token and still fuses.
    train_only: bool = True
    #: How the fusion Linear starts. "pytorch": nn.Linear's default init, weight and bias (the
    #: public code's, reference.md §8). "identity": weight [0 | I] and zero bias, so without routing
    #: the fused output is the span output and a pretrained PRX fine-tunes with SPRINT without a jump.
    fusion_init: Literal["pytorch", "identity"] = "pytorch"

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be >= 0 (a 0-based block index), got {self.start}")
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must be <= end ({self.end}); the span start..end is inclusive")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (the fraction of tokens routed), got {self.ratio}")
        if self.fusion_init not in ("pytorch", "identity"):
            raise ValueError(f"fusion_init must be 'pytorch' or 'identity', got {self.fusion_init!r}")


def _build(config: SprintConfig, run: Any) -> SprintRouter:
    from prx_core.routing import check_span
    from prx_sprint.router import SprintRouter

    check_span(config.start, config.end, run.recipe.model.depth)
    return SprintRouter(config, seed=run.recipe.seed)


@hookimpl
def prx_register_token_routers(registry: Any) -> None:
    registry.register(INFO.name, _build, SprintConfig)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses a span past the model's last block, as building the router would."""
    from prx_core.recipe_checks import router_span_problems

    return router_span_problems(recipe, INFO.name)


@hookimpl
def prx_build_modules(run: RunContext) -> dict[str, torch.nn.Module] | None:
    router = run.router
    if router is None:
        return None
    from prx_sprint.fusion import SprintFusion
    from prx_sprint.router import MODULE_NAME, SprintRouter

    if not isinstance(router, SprintRouter):
        return None
    # The default init draws from the global generator, which the core seeds from (recipe seed,
    # plugin name) around this hook: reproducible, and independent of plugin order.
    fusion = SprintFusion(
        run.recipe.model.hidden_size, init=router.fusion_init, dtype=run.require("precision").param_dtype
    )
    return {MODULE_NAME: fusion}
