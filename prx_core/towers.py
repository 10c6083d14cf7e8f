"""Building a run's slots, and the two towers (latent space, text encoder) that feed the step.

When a data source carries precomputed encodings (``prx-run precompute``), a training step needs
neither tower: they are built lazily (:class:`LazyTower`), at setup when the run samples or
evaluates during training (the trainer asks for them then), else on first use.
:func:`batch_encodings` turns any batch into ``(x0, text, mask)``: stored encodings as they are,
towers for whatever is missing. The trainer, ``prx-run precompute`` and evaluation share these.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from prx_core.config import RecipeError
from prx_core.errors import TrainingError
from prx_core.slots import EncodingsSource
from prx_core.text_cache import padded_length, token_counts
from prx_core.transfer import images_to_float, to_device, to_device_packed

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


def batch_to_device(
    raw: RawBatch, device: torch.device, pad_multiple: int = 0, empty_length: int | None = None
) -> tuple[RawBatch, list[int] | None]:
    """The batch with every tensor it carries on ``device``, in one copy; and the token count of
    each stored text row, read from the host mask before it left (None without stored text).

    Stored text is cut first to its longest row (or the empty prompt, ``empty_length``, which
    caption dropout may put in) rounded up to ``pad_multiple``: the padding never crosses. Images
    cross as they are (uint8 pixels: 4× fewer bytes than fp32; :func:`batch_images` converts).
    """
    text_BLD, mask_BL, lengths = raw.text_BLD, raw.mask_BL, None
    if text_BLD is not None and mask_BL is not None and mask_BL.device.type == "cpu":
        lengths = token_counts(mask_BL)
        if pad_multiple:
            longest = max([*lengths, *([empty_length] if empty_length is not None else [])], default=0)
            keep = padded_length(longest, text_BLD.shape[1], pad_multiple)
            text_BLD, mask_BL = text_BLD[:, :keep], mask_BL[:, :keep]
    tensors = {
        "images_BCHW": raw.images_BCHW,
        "latents_BCHW": raw.latents_BCHW,
        "latent_std_BCHW": raw.latent_std_BCHW,
        "text_BLD": text_BLD,
        "mask_BL": mask_BL,
        **{f"features.{k}": v for k, v in (raw.features or {}).items()},
    }
    present = {k: v for k, v in tensors.items() if v is not None}
    moved = dict(zip(present, to_device_packed(list(present.values()), device), strict=True))
    features = {k: moved[f"features.{k}"] for k in raw.features} if raw.features is not None else None
    fields: dict[str, Any] = {k: v for k, v in moved.items() if not k.startswith("features.")}
    return dataclasses.replace(raw, **fields, features=features), lengths


def batch_images(raw: RawBatch, device: torch.device) -> torch.Tensor | None:
    """The batch's images on ``device`` as float32 in [0, 1]: one copy of the pixels as they are
    (uint8 stays uint8 until it is there, unless :func:`batch_to_device` moved it), converted there.
    None for a batch without images."""
    if raw.images_BCHW is None:
        return None
    return images_to_float(to_device(raw.images_BCHW, device))


def batch_latents(
    raw: RawBatch,
    run: RunContext,
    generator: torch.Generator | None,
    images_BCHW: torch.Tensor | None = None,
    device_draws: torch.Generator | None = None,
) -> torch.Tensor:
    """``x0_BCHW`` of a batch in :data:`DATA_DTYPE` (fp32): stored latents, else the latent space on
    the images (``images_BCHW``: the batch's images already on the device, see :func:`batch_images`).

    Stored latents with a posterior std are sampled as ``mean + std · ε``, ε drawn in the frozen
    dtype from ``device_draws`` where given (a device generator: no copy), else from ``generator``
    on the CPU, exactly as the online ``encode(images, generator)`` of a KL latent space draws it;
    without a generator (validation) the mean is used, as ``encode(images, None)`` would.
    """
    precision = run.require("precision")
    with torch.no_grad():
        if raw.latents_BCHW is not None:
            mean_BCHW = to_device(raw.latents_BCHW, run.device).to(precision.frozen_dtype)
            x0_BCHW = mean_BCHW
            draws = device_draws or generator
            if raw.latent_std_BCHW is not None and draws is not None:
                eps_BCHW = torch.randn(mean_BCHW.shape, generator=draws, dtype=mean_BCHW.dtype, device=draws.device)
                std_BCHW = to_device(raw.latent_std_BCHW, run.device).to(mean_BCHW.dtype)
                x0_BCHW = mean_BCHW + std_BCHW * eps_BCHW.to(run.device)
        elif raw.images_BCHW is not None:
            if images_BCHW is None:
                images_BCHW = batch_images(raw, run.device)
            x0_BCHW = run.require("latent_space").encode(images_BCHW, generator)
        else:
            raise TrainingError("the data source returned a batch with neither images nor latents")
    return x0_BCHW.to(DATA_DTYPE)


def batch_text(
    raw: RawBatch,
    run: RunContext,
    dropped: list[bool] | None = None,
    empty: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    pad_multiple: int = 0,
    stored_lengths: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(text_BLD, mask_BL, padded)`` of a batch, text in :data:`DATA_DTYPE`, on the device.

    Rows flagged in ``dropped`` (caption dropout, decided on the host) get the empty prompt
    ``empty`` = (states_1LD, mask_1L, its token count): online, their captions become ``""``
    before encoding (the cached empty encoding, no encoder work); stored text gets the empty
    states row by row on the device (no flags copied). With ``pad_multiple`` > 0 the text is cut
    to the batch's longest caption rounded up to that multiple (padding is masked, so the
    denoiser computes the same up to rounding). The lengths are known on the host (from the
    tokenizer; for stored text ``stored_lengths`` from :func:`batch_to_device`, or a host mask),
    so nothing is read back from the device. ``padded`` is False when no row has padding:
    attention then needs no mask.
    """
    flags = dropped if dropped is not None else [False] * len(raw.captions)
    if len(flags) != len(raw.captions):
        raise ValueError(f"{len(flags)} caption-dropout flags for a batch of {len(raw.captions)}")
    dropped_rows = [row for row, drop in enumerate(flags) if drop]
    if dropped_rows and empty is None:
        raise ValueError("caption dropout needs the empty-prompt encoding (empty=)")
    with torch.no_grad():
        if raw.text_BLD is None:
            encoder = run.require("text_encoder")
            prompts = ["" if drop else caption for caption, drop in zip(raw.captions, flags, strict=True)]
            encode_batch = getattr(encoder, "encode_batch", None)
            if encode_batch is not None:
                text_BLD, mask_BL, lengths = encode_batch(prompts, pad_multiple)
            else:  # a bare TextEncoder: full length, lengths read from the mask
                text_BLD, mask_BL = encoder.encode(prompts)
                lengths = token_counts(mask_BL)
            return text_BLD.to(DATA_DTYPE), mask_BL, min(lengths, default=0) < text_BLD.shape[1]
        if raw.mask_BL is None:
            raise TrainingError("the data source returned text states without their mask")
        length = raw.text_BLD.shape[1]
        padded = True
        lengths = stored_lengths
        if lengths is None and raw.mask_BL.device.type == "cpu":  # a host mask tells the lengths for free
            lengths = token_counts(raw.mask_BL)
        if lengths is not None:
            if empty is not None:
                lengths = [empty[2] if drop else n for drop, n in zip(flags, lengths, strict=True)]
            if pad_multiple:
                length = padded_length(max(lengths, default=0), length, pad_multiple)
            padded = min(lengths, default=0) < length
        text_BLD = to_device(raw.text_BLD[:, :length], run.device).to(DATA_DTYPE)
        mask_BL = to_device(raw.mask_BL[:, :length], run.device)
        if empty is not None and dropped_rows:
            if text_BLD.data_ptr() == raw.text_BLD.data_ptr() or mask_BL.data_ptr() == raw.mask_BL.data_ptr():
                # No copy was made: never write into the tensors the source handed over.
                text_BLD, mask_BL = text_BLD.clone(), mask_BL.clone()
            empty_states_1LD, empty_mask_1L, _ = empty
            for row in dropped_rows:  # one device-side copy per dropped row, no flags on the device
                text_BLD[row] = empty_states_1LD[0, :length].to(DATA_DTYPE)
                mask_BL[row] = empty_mask_1L[0, :length]
    return text_BLD, mask_BL, padded


def batch_encodings(
    raw: RawBatch, run: RunContext, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0_BCHW, text_BLD, mask_BL)`` of a batch, x0 and text in :data:`DATA_DTYPE` (fp32), text at
    full length and nothing dropped (validation, ``prx-run precompute``).

    Encodings the batch carries are used as they are; the towers run only for what is missing
    (:func:`batch_latents`, :func:`batch_text`).
    """
    x0_BCHW = batch_latents(raw, run, generator)
    text_BLD, mask_BL, _ = batch_text(raw, run)
    return x0_BCHW, text_BLD, mask_BL
