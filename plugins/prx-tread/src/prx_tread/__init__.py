"""Token router ``tread``: image tokens skip a span of blocks at random (TREAD, reference.md §4).

TREAD (Krause et al. 2025, arXiv 2501.04765) routes a random fraction p of each sample's image
tokens around blocks ``start..end`` (inclusive) during training: they bypass the span and are put
back, unchanged, after block ``end``. The visible tokens keep their order and their RoPE rows,
text K/V are untouched. The span then costs about (1 − p) of its dense compute.

Routes come from the generator the core keys by (seed, "route", step, micro-step, rank), so
gradient accumulation, activation-checkpoint recomputation (which replays blocks, not the
router) and a resumed run all see the same routes, while steps and ranks differ.

Optional **self-guidance** replaces classifier-free guidance at sampling:
out = routed + s·(full − routed), both passes with the real prompt. Each sample keeps one route,
keyed on its noise index, for every denoising step. The public code evaluates its TREAD runs this
way at s = 3.5 (reference.md §8); the default here is 0 (classifier-free guidance), and the study's
TREAD recipes set it.

Importing this module is torch-free (``prx-run plugins``/``check`` import it); the router lives
in :mod:`prx_tread.router` and is imported by the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_core.context import RunContext
    from prx_core.slots import Guidance
    from prx_tread.router import TreadRouter

__all__ = ["INFO", "prx_check_recipe", "TreadConfig", "prx_guidance", "prx_register_token_routers"]

INFO = PluginInfo(
    name="tread",
    summary="Token router: a random fraction p of image tokens skips blocks start..end (TREAD); "
    "optional self-guidance at sampling",
    spec="reference.md §4 (TREAD)",
    paper="https://arxiv.org/abs/2501.04765",
)


@dataclass(frozen=True)
class TreadConfig:
    """The ``[router]`` table when ``use = "tread"``."""

    #: First routed block (0-based). reference.md §4: 2.
    start: int = 2
    #: Last routed block, inclusive (0-based; must be < model.depth). reference.md §4: 12 (of 16).
    end: int = 12
    #: p, the fraction of each sample's image tokens that skips the span: round(p·N) of N tokens
    #: (Python's round, halves to even; at least 1 when p > 0) skip it, the rest stay.
    ratio: float = 0.5
    #: Route only in training forwards. With false, sampling routes too (rarely wanted).
    train_only: bool = True
    #: s > 0 replaces classifier-free guidance at sampling with out = routed + s·(full − routed),
    #: each sample routed the same way at every step; 0 keeps CFG (``sampling.cfg``/``eval.cfg``).
    #: The public code's TREAD runs evaluate with s = 3.5 (reference.md §8).
    self_guidance: float = 0.0

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be >= 0 (a 0-based block index), got {self.start}")
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) must be <= end ({self.end}); the span start..end is inclusive")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1) (the fraction of tokens routed), got {self.ratio}")
        if self.self_guidance < 0.0:
            raise ValueError(f"self_guidance must be >= 0 (0 = off), got {self.self_guidance}")


def _build(config: TreadConfig, run: Any) -> TreadRouter:
    from prx_core.routing import check_span
    from prx_tread.router import TreadRouter

    check_span(config.start, config.end, run.recipe.model.depth)
    if config.self_guidance > 0:
        run.logger.info(
            "tread: self-guidance s = %s replaces classifier-free guidance at sampling "
            "(sampling.cfg and eval.cfg are not used)",
            config.self_guidance,
        )
    return TreadRouter(config, seed=run.recipe.seed)


@hookimpl
def prx_register_token_routers(registry: Any) -> None:
    registry.register(INFO.name, _build, TreadConfig)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses a span past the model's last block, as building the router would."""
    from prx_core.recipe_checks import router_span_problems

    return router_span_problems(recipe, INFO.name)


@hookimpl
def prx_guidance(run: RunContext) -> Guidance | None:
    router = run.router
    if router is None:
        return None
    from prx_tread.router import SelfGuidance, TreadRouter

    if not isinstance(router, TreadRouter) or router.self_guidance <= 0:
        return None
    return SelfGuidance(router, router.self_guidance, seed=run.recipe.seed)
