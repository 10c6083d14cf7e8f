"""The ``sprint`` router object.

``enter`` (before block ``start``) keeps the dense input and, in training, hands the span a random
N − round(p·N) of the tokens (:func:`prx_core.routing.visible_count`); ``exit`` (after block
``end``) fuses the dense input with the span output through the
:class:`~prx_sprint.fusion.SprintFusion` module of the weights being run, taken from
``ctx.extras`` — the trained module in a training step, the EMA copy when sampling with EMA (the
reference forgot the fusion on the EMA copy, reference.md §7.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prx_core.keys import ROUTE_PLAN, RoutePlan, StashKey
from prx_core.routing import choose_visible, gather_rope, gather_tokens
from prx_core.seeding import generator_for

if TYPE_CHECKING:
    from prx_core.context import ForwardContext
    from prx_sprint import SprintConfig
    from prx_sprint.fusion import SprintFusion

#: Key of the fusion module in ``run.trainable.extras`` / ``ctx.extras``.
MODULE_NAME = "sprint"
#: Purpose key of routes drawn without a core generator (``train_only = false`` at sampling).
UNKEYED_PURPOSE = "sprint-unkeyed"


@dataclass(frozen=True)
class _Entered:
    """What ``exit`` needs from ``enter`` in the same forward."""

    dense_BNH: torch.Tensor
    #: None when every token ran through the span (no routing, e.g. at evaluation).
    visible_idx_BK: torch.Tensor | None


#: Private to this plugin: the dense input of block ``start`` and the route, from enter to exit.
_ENTERED: StashKey[_Entered] = StashKey("sprint.entered")


class SprintRouter:
    """Sparse span over blocks ``start..end``, fused with its dense input after ``end``."""

    def __init__(self, config: SprintConfig, seed: int) -> None:
        self.start = config.start
        self.end = config.end
        self.ratio = config.ratio
        self.train_only = config.train_only
        #: How ``prx_build_modules`` initialises the fusion (see :class:`~prx_sprint.fusion.SprintFusion`).
        self.fusion_init = config.fusion_init
        self.seed = seed

    def _generator(self, ctx: ForwardContext) -> torch.Generator | None:
        if self.ratio == 0.0 or (self.train_only and not ctx.training):
            return None
        if ctx.generator is not None:
            return ctx.generator
        return generator_for(self.seed, UNKEYED_PURPOSE, "training" if ctx.training else "sampling")

    def _route(self, batch: int, length: int, generator: torch.Generator, training: bool) -> torch.Tensor:
        # Training: one route per sample. Sampling (train_only = false): one route for the batch,
        # so an image does not depend on the batch it is generated in (the core's promise).
        if training:
            return choose_visible(batch, length, self.ratio, generator)
        return choose_visible(1, length, self.ratio, generator).expand(batch, -1)

    def enter(
        self, img_BNH: torch.Tensor, rope: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Always enter, even with nothing to route: the fusion after ``end`` is part of the model
        # and must run at evaluation too (p = 0: every token visible).
        generator = self._generator(ctx)
        if generator is None:
            ctx.stash[_ENTERED] = _Entered(img_BNH, None)
            return img_BNH, rope
        batch, length, _ = img_BNH.shape
        visible_idx_BK = self._route(batch, length, generator, ctx.training).to(img_BNH.device)
        ctx.stash[_ENTERED] = _Entered(img_BNH, visible_idx_BK)
        ctx.stash[ROUTE_PLAN] = RoutePlan(visible_idx_BK, length, self.start, self.end)
        return gather_tokens(img_BNH, visible_idx_BK), gather_rope(rope, visible_idx_BK)

    def exit(self, img_BKH: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        entered = ctx.stash[_ENTERED]
        fusion = _fusion(ctx)
        return fusion(entered.dense_BNH, img_BKH, entered.visible_idx_BK)


def _fusion(ctx: ForwardContext) -> SprintFusion:
    try:
        return ctx.extras[MODULE_NAME]  # type: ignore[return-value]
    except KeyError:
        raise RuntimeError(
            f"sprint: the weights being run have no '{MODULE_NAME}' fusion module in ctx.extras; it is built by "
            "prx_build_modules and must travel with the weights (trained, EMA or loaded)"
        ) from None
