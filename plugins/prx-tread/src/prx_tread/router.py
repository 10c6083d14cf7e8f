"""The ``tread`` router object and its self-guidance rule.

The core's block loop calls :meth:`TreadRouter.enter` before block ``start`` and
:meth:`TreadRouter.exit` after block ``end`` (see :func:`prx_core.denoiser.denoise`). What one
forward needs to remember between the two calls lives in that forward's stash, not on the router,
so a router serves any number of forwards (micro-steps, the two self-guidance passes, EMA
sampling) without leaking state between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from prx_core.keys import ROUTE_PLAN, RoutePlan, StashKey
from prx_core.routing import choose_visible, gather_rope, gather_tokens, scatter_tokens
from prx_core.seeding import generator_for

if TYPE_CHECKING:
    from prx_core.context import ForwardContext
    from prx_tread import TreadConfig

#: Purpose key of the routes drawn for self-guidance at sampling (see :func:`guidance_generator`).
GUIDANCE_PURPOSE = "tread-self-guidance"
#: Purpose key of the routes drawn when routing outside a training step without a core generator.
UNKEYED_PURPOSE = "tread-unkeyed"


@dataclass(frozen=True)
class _Entered:
    """What ``exit`` needs from ``enter`` in the same forward."""

    full_BNH: torch.Tensor
    visible_idx_BK: torch.Tensor


#: Private to this plugin: the full-length tokens and the route, from ``enter`` to ``exit``.
_ENTERED: StashKey[_Entered] = StashKey("tread.entered")


#: ``route(batch, length) -> visible_idx_BK``: the route a forced forward uses (CPU, int64, sorted).
ForcedRoute = Callable[[int, int], torch.Tensor]


def guidance_generator(seed: int, sample_seed: int, sample_key: int) -> torch.Generator:
    """The generator of one sample's self-guidance route.

    A function of the run's seed, the generation's noise seed and the sample's key (its noise
    index in ``Trainer.generate``) only: the sample's position in the batch, the batch size and the
    denoising step play no part, so a sample keeps one route for the whole generation (as the
    public code does, reference.md §8) and gets the same one in whatever batch it is made.
    """
    return generator_for(seed, GUIDANCE_PURPOSE, sample_seed, sample_key)


class TreadRouter:
    """Routes a random ``ratio`` of each sample's image tokens around blocks ``start..end``."""

    def __init__(self, config: TreadConfig, seed: int) -> None:
        self.start = config.start
        self.end = config.end
        self.ratio = config.ratio
        self.train_only = config.train_only
        self.self_guidance = config.self_guidance
        self.seed = seed
        # Set only around the routed pass of self-guidance (see ``forced``).
        self._forced: ForcedRoute | None = None

    @contextmanager
    def forced(self, route: ForcedRoute) -> Iterator[None]:
        """Route every forward inside the block with ``route(batch, length)``, even at sampling."""
        if self._forced is not None:
            raise RuntimeError("tread: forced routing is already on (nested self-guidance passes)")
        self._forced = route
        try:
            yield
        finally:
            self._forced = None

    def _generator(self, ctx: ForwardContext) -> tuple[torch.Generator, bool] | None:
        """The generator to route this forward with, and whether each sample draws its own route.

        Training routes each sample independently. Sampling with ``train_only = false`` draws one
        route for the whole batch: the core promises that an image does not depend on the batch it
        is generated in, and a per-sample draw from one generator would tie sample i's route to its
        position in the batch. (Self-guidance knows each sample's key and routes per sample, through
        ``forced``.)
        """
        if self.train_only and not ctx.training:
            return None
        if ctx.generator is not None:
            return ctx.generator, ctx.training
        # Routing without a keyed generator (sampling with train_only = false, or a forward built
        # by hand): a fixed key keeps it reproducible.
        return generator_for(self.seed, UNKEYED_PURPOSE, "training" if ctx.training else "sampling"), ctx.training

    def enter(
        self, img_BNH: torch.Tensor, rope: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.ratio == 0.0:
            return None  # p = 0: nothing is routed, so the forward is exactly the unrouted one
        batch, length, _ = img_BNH.shape
        if self._forced is not None:
            visible_idx_BK = self._forced(batch, length)
        else:
            chosen = self._generator(ctx)
            if chosen is None:
                return None
            generator, per_sample = chosen
            if per_sample:
                visible_idx_BK = choose_visible(batch, length, self.ratio, generator)
            else:
                visible_idx_BK = choose_visible(1, length, self.ratio, generator).expand(batch, -1)
        visible_idx_BK = visible_idx_BK.to(img_BNH.device)
        ctx.stash[_ENTERED] = _Entered(img_BNH, visible_idx_BK)
        ctx.stash[ROUTE_PLAN] = RoutePlan(visible_idx_BK, length, self.start, self.end)
        return gather_tokens(img_BNH, visible_idx_BK), gather_rope(rope, visible_idx_BK)

    def exit(self, img_BKH: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        entered = ctx.stash[_ENTERED]
        # Routed tokens skip the span: they come back exactly as they entered block ``start``.
        return scatter_tokens(entered.full_BNH, img_BKH, entered.visible_idx_BK)


class SelfGuidance:
    """TREAD self-guidance, replacing classifier-free guidance at sampling.

    out = routed + s·(full − routed): both passes see the real prompt; the routed pass (the same
    weights run with ``ratio`` of the tokens skipping the span) plays the part of the weaker,
    unconditional branch of CFG. The unconditional prompt is not used.

    This is the object the ``prx_guidance`` hook returns; the sampler binds it to the samples of a
    generation with :meth:`for_samples` (see :class:`prx_core.slots.PerSampleGuidance`) before the
    first step. Each sample then routes by its own key, one route for every step.
    """

    def __init__(self, router: TreadRouter, scale: float, seed: int) -> None:
        self.router = router
        self.scale = scale
        self.seed = seed

    def for_samples(self, seed: int, sample_keys: Sequence[int]) -> SampleSelfGuidance:
        return SampleSelfGuidance(self.router, self.scale, self.seed, seed, tuple(sample_keys))

    def __call__(
        self,
        velocity: Callable[..., torch.Tensor],
        x_t_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        raise RuntimeError(
            "tread: self-guidance routes each sample by its key; bind it to the generation's samples with "
            "for_samples(seed, sample_keys) first (prx_core.sampling.euler_sample does)"
        )


@dataclass
class SampleSelfGuidance:
    """Self-guidance bound to the samples of one generation: sample b routes by ``sample_keys[b]``.

    The route of a sample is drawn once, at the first routed pass (when the token count is
    known), from :func:`guidance_generator` and reused at every later step.
    """

    router: TreadRouter
    scale: float
    seed: int
    sample_seed: int
    sample_keys: tuple[int, ...]
    #: token count N -> visible_idx_BK, filled at the first routed pass.
    _routes: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def route(self, batch: int, length: int) -> torch.Tensor:
        """The visible indices of every sample, [B, K]: row b is sample ``sample_keys[b]``'s route."""
        if batch != len(self.sample_keys):
            raise ValueError(
                f"tread self-guidance was bound to {len(self.sample_keys)} samples but the forward has {batch}"
            )
        if length not in self._routes:
            rows = [
                choose_visible(1, length, self.router.ratio, guidance_generator(self.seed, self.sample_seed, key))
                for key in self.sample_keys
            ]
            self._routes[length] = torch.cat(rows)
        return self._routes[length]

    def __call__(
        self,
        velocity: Callable[..., torch.Tensor],
        x_t_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        full = velocity(x_t_BCHW, t_B, *cond)
        with self.router.forced(self.route):
            routed = velocity(x_t_BCHW, t_B, *cond)
        return routed + self.scale * (full - routed)
