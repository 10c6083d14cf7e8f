"""Building a run's slots, and the two towers (latent space, text encoder) that feed the step.

When a data source carries precomputed encodings (``prx-run precompute``), a training step needs
neither tower: they are built lazily (:class:`LazyTower`) on the first sample grid or evaluation.
:func:`batch_encodings` turns any batch into ``(x0, text, mask)``: stored encodings as they are,
towers for whatever is missing. The trainer, ``prx-run precompute`` and evaluation share these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from prx_core.config import RecipeError
from prx_core.errors import TrainingError
from prx_core.slots import EncodingsSource

if TYPE_CHECKING:
    from prx_core.context import RunContext
    from prx_core.recipe import Recipe
    from prx_core.slots import RawBatch

logger = logging.getLogger("prx")

#: The dtype of the data a step computes with: x0, the noise, t, x_t, the target and the text
#: states are fp32 whatever the precision policy. Policies differ in where weights live and in
#: autocast, never in the data: ``bf16_weights`` must differ from ``bf16_mixed`` in weight storage
#: only (the reference computes x_t, the target and t in fp32 too, reference.md §8).
DATA_DTYPE = torch.float32


def build_slot(recipe: Recipe, run: RunContext, slot: str) -> Any:
    """The recipe's entry for ``slot``, built by its factory (also used by ``prx-run precompute``)."""
    choice = recipe.slots[slot]
    entry = recipe.active.registries[slot].get(choice.use)
    with setup_errors(f"cannot build {slot} '{choice.use}'"):
        return entry.factory(choice.config, run)


@contextmanager
def setup_errors(what: str) -> Iterator[None]:
    """Missing weights, files or packages while a run is built become one clear :class:`TrainingError`
    (``prx-run`` prints its message instead of a traceback); the original stays chained."""
    from prx_core.weights import WeightsError

    try:
        yield
    except RecipeError:
        raise  # already names the recipe key; prx-run prints it as it is
    except (OSError, ImportError, ValueError, WeightsError) as err:
        raise TrainingError(f"{what}: {err}") from err


def provides_encodings(data: Any) -> bool:
    """Whether a data source's batches carry latents and text states (:class:`EncodingsSource`)."""
    return isinstance(data, EncodingsSource) and bool(data.provides_encodings)


class LazyTower:
    """A latent space or text encoder that is built on first real use.

    When batches carry precomputed encodings a training step needs neither tower, so neither is
    held in memory until sampling or evaluation asks for it. Until then the proxy answers the
    shape attributes (``channels``, ``spatial_compression``, ``dim``, ``max_length``) from the
    slot's config, which must tell them without loading (:class:`LatentSpaceConfig`,
    :class:`TextEncoderConfig`); the loaded tower is checked against those answers.
    """

    def __init__(self, slot: str, build: Any, known: dict[str, Any]) -> None:
        self._slot = slot
        self._build = build
        self._known = known
        self._tower: Any = None

    @property
    def loaded(self) -> bool:
        return self._tower is not None

    def tower(self) -> Any:
        if self._tower is None:
            logger.info("loading the %s on first use (training itself runs from precomputed encodings)", self._slot)
            tower = self._build()
            for name, value in self._known.items():
                if getattr(tower, name) != value:
                    raise TrainingError(
                        f"the loaded {self._slot} has {name} = {getattr(tower, name)}, but its config and the "
                        f"precomputed data say {value}"
                    )
            self._tower = tower
        return self._tower

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_slot", "_build", "_known", "_tower"):
            raise AttributeError(name)
        if name in self._known:
            return self._known[name]
        return getattr(self.tower(), name)


def build_tower(recipe: Recipe, run: RunContext, slot: str, lazy: bool) -> Any:
    """The latent space or text encoder: built now, or a :class:`LazyTower` that builds on first use."""
    if not lazy:
        return build_slot(recipe, run, slot)
    config = recipe.slot_config(slot)
    if slot == "latent_space":
        known = {"channels": int(config.channels), "spatial_compression": int(config.spatial_compression)}
    else:
        length = getattr(config, "max_length", None)
        if length is None:  # the stored text states tell it
            length = getattr(run.data, "text_shape", (None,))[0]
        known = {"dim": int(config.dim), **({"max_length": int(length)} if length is not None else {})}
    return LazyTower(slot, lambda: build_slot(recipe, run, slot), known)


def batch_encodings(
    raw: RawBatch, run: RunContext, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0_BCHW, text_BLD, mask_BL)`` of a batch, x0 and text in :data:`DATA_DTYPE` (fp32).

    Encodings the batch carries are used as they are; the towers run only for what is missing.
    Stored latents with a posterior std are sampled as ``mean + std · ε``, ε drawn from
    ``generator`` in the frozen dtype on the CPU generator, exactly as the online
    ``encode(images, generator)`` of a KL latent space draws it; without a generator (validation)
    the mean is used, as ``encode(images, None)`` would.
    """
    precision = run.require("precision")
    with torch.no_grad():
        if raw.latents_BCHW is not None:
            mean_BCHW = raw.latents_BCHW.to(run.device, precision.frozen_dtype)
            x0_BCHW = mean_BCHW
            if raw.latent_std_BCHW is not None and generator is not None:
                eps_BCHW = torch.randn(mean_BCHW.shape, generator=generator, dtype=mean_BCHW.dtype).to(run.device)
                x0_BCHW = mean_BCHW + raw.latent_std_BCHW.to(run.device, mean_BCHW.dtype) * eps_BCHW
        elif raw.images_BCHW is not None:
            x0_BCHW = run.require("latent_space").encode(raw.images_BCHW.to(run.device), generator)
        else:
            raise TrainingError("the data source returned a batch with neither images nor latents")
        if raw.text_BLD is not None:
            if raw.mask_BL is None:
                raise TrainingError("the data source returned text states without their mask")
            text_BLD, mask_BL = raw.text_BLD.to(run.device), raw.mask_BL.to(run.device)
        else:
            text_BLD, mask_BL = run.require("text_encoder").encode(raw.captions)
    return x0_BCHW.to(DATA_DTYPE), text_BLD.to(DATA_DTYPE), mask_BL
