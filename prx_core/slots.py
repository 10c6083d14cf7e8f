"""Protocols for the objects that fill the exclusive slots.

A registry entry's factory returns an object following one of these protocols. They are
structural (``typing.Protocol``), so a plugin never subclasses anything from core.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from prx_core.context import ForwardContext, StepContext


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class LatentSpaceConfig(Protocol):
    """A latent space's config must tell its shape without loading weights (for ``check``)."""

    @property
    def channels(self) -> int: ...
    @property
    def spatial_compression(self) -> int: ...


class LatentSpace(Protocol):
    channels: int
    spatial_compression: int

    def encode(self, images_BCHW: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Images in [0, 1] to normalised latents."""
        ...

    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Latents back to images in [0, 1]."""
        ...


@runtime_checkable
class DistributionLatentSpace(Protocol):
    """Optional extra of a :class:`LatentSpace` whose encoder is a Gaussian posterior (a KL VAE).

    ``prx-run precompute`` stores the posterior once and training draws a fresh latent each step
    as ``mean + std · ε`` with the step's generator, as the online ``encode(images, generator)``
    would. Both are in the *normalised* space the denoiser sees: the normalisations in use are
    affine per channel (and sub-pixel), so the normalised mean is the normalised posterior mean
    (what ``encode(images, None)`` returns) and the std is the raw std times the scale. A
    deterministic space (DC-AE, pixel) simply does not define it.
    """

    def encode_distribution(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] to ``(mean_BCHW, std_BCHW)`` of the posterior, normalised."""
        ...


@runtime_checkable
class PipelineLatentSpace(Protocol):
    """Optional extra of a :class:`LatentSpace`, asked for by ``prx-run export``.

    A latent space backed by a standard diffusers autoencoder (``AutoencoderKL``,
    ``AutoencoderDC``) may define ``pipeline_vae`` returning that frozen module, with its config's
    ``scaling_factor`` / ``shift_factor`` describing this latent space's normalisation
    (``PRXPipeline`` decodes ``latents / scaling_factor + shift_factor``); ``None`` (or no method)
    means no standard component exists, and export then writes only the transformer.
    """

    def pipeline_vae(self) -> torch.nn.Module | None: ...


class TextEncoderConfig(Protocol):
    """The text width is needed before loading, to size the denoiser's ``context_in_dim``."""

    @property
    def dim(self) -> int: ...


class TextEncoder(Protocol):
    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to (states_BLD, mask_BL) with L == max_length; mask is bool, True = real token."""
        ...

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty-prompt encoding (1, L, D), (1, L); computed once and cached."""
        ...


@runtime_checkable
class PipelineTextEncoder(Protocol):
    """Optional extra of a :class:`TextEncoder`, asked for by ``prx-run export``.

    An encoder that is a standard transformers model may define ``pipeline_text_components``
    returning ``(model, tokenizer)`` as ``PRXPipeline`` uses them: the pipeline tokenizes with the
    tokenizer's own ``padding_side`` and ``model_max_length``, so the returned tokenizer must be set
    up to reproduce training's encoding. ``None`` (or no method) means no standard component.
    """

    def pipeline_text_components(self) -> tuple[torch.nn.Module, Any] | None: ...


class Objective(Protocol):
    caption_dropout: float
    shift: float

    def sample_timesteps(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Training timesteps t_B in (0, 1), t = 1 is noise."""
        ...

    def loss(self, step: StepContext, prediction_BCHW: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B]. Publishes x̂0 under :data:`prx_core.keys.X0_PREDICTION`."""
        ...

    def velocity(self, prediction_BCHW: torch.Tensor, x_t_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """Convert the model output to the velocity v = ε − x0 the Euler sampler integrates."""
        ...


class TokenRouter(Protocol):
    """Skips a subset of image tokens over blocks ``start..end`` (inclusive).

    ``enter`` runs before block ``start`` and returns the visible tokens and their RoPE entries
    (or ``None`` to route nothing in this forward); ``exit`` runs after block ``end`` and returns
    the full-length sequence. Route plans go in the stash under ``ROUTE_PLAN``.
    """

    start: int
    end: int

    def enter(
        self, img_BLH: torch.Tensor, rope: torch.Tensor, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def exit(self, img_BKH: torch.Tensor, ctx: ForwardContext) -> torch.Tensor: ...


class ConditioningSeam(Protocol):
    """Changes the conditioning before the first block (e.g. resolution-aware tokens or vectors).

    Receives the projected text tokens, their mask (True = attend), the time vector and the noisy
    input (for its shape), and returns the three, possibly with extra text tokens. Plugin
    modules come from ``ctx.extras``.
    """

    def condition(
        self,
        txt_BTH: torch.Tensor,
        mask_BT: torch.Tensor | None,
        vec_BH: torch.Tensor,
        x_t_BCHW: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]: ...


class PrecisionPolicy(Protocol):
    """The single authority on dtypes. Plugins ask it instead of naming a dtype."""

    name: str
    #: Trainable weights (and their gradients).
    param_dtype: torch.dtype
    #: Frozen towers: text encoder, autoencoder, teachers.
    frozen_dtype: torch.dtype
    #: Long-lived accumulators: optimizer state and EMA weights (fp32 in every shipped policy).
    state_dtype: torch.dtype
    #: Shown loudly in the log and the tracker when set (e.g. the bf16-weights ablation).
    warning: str | None

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]: ...

    def check(self, modules: torch.nn.Module, optimizer: torch.optim.Optimizer | None, when: str) -> None:
        """Raise if weights, gradients or optimizer state are not in the dtypes promised."""
        ...


@dataclass(frozen=True)
class BatchRequest:
    """Which samples a rank needs: a pure function of these fields, so resume is exact."""

    step: int
    micro_step: int
    accumulation: int
    rank: int
    world_size: int
    size: int
    seed: int

    def first_sample(self) -> int:
        """Index of this request's first sample in the global sample stream.

        The stream is laid out step-major, then micro-step, then rank, so every sample is seen
        exactly once whatever the world size, and a resumed run continues where it stopped.
        """
        return ((self.step * self.accumulation + self.micro_step) * self.world_size + self.rank) * self.size

    def following(self) -> BatchRequest:
        """The request the trainer makes next: the next micro-step, or micro-step 0 of the next step.

        Sources that read ahead (decode the next micro-batch while this one trains) key on it.
        """
        if self.micro_step + 1 < self.accumulation:
            return dataclasses.replace(self, micro_step=self.micro_step + 1)
        return dataclasses.replace(self, step=self.step + 1, micro_step=0)


@dataclass
class RawBatch:
    """One micro-batch as a data source hands it over.

    Pixel sources fill ``images_BCHW``; a source of precomputed encodings (``prx-run precompute``)
    fills the encodings instead and may leave ``images_BCHW`` None. The trainer uses every
    encoding that is present and runs the matching tower only for what is missing.
    """

    #: uint8 pixels (decoded files: the trainer copies them to the device as they are and converts
    #: there) or float32 in [0, 1] (rendered data); :func:`prx_core.transfer.images_to_float`.
    images_BCHW: torch.Tensor | None
    captions: list[str]
    #: Normalised latents; with ``latent_std_BCHW`` the posterior mean (sampled each step).
    latents_BCHW: torch.Tensor | None = None
    #: Posterior std in the normalised space; None: ``latents_BCHW`` are used as they are.
    latent_std_BCHW: torch.Tensor | None = None
    #: Text states and mask of ``captions`` (as :meth:`TextEncoder.encode` returns them).
    text_BLD: torch.Tensor | None = None
    mask_BL: torch.Tensor | None = None
    #: Precomputed plugin targets (``prx_precompute_features``), rows aligned with the batch.
    features: dict[str, torch.Tensor] | None = None
    #: Which dataset item each row is (after bad-data substitution), for logging and resume checks.
    sample_ids: list[int] | None = None


class DataSource(Protocol):
    #: Identifies the data content, so a resume on different data can be refused.
    fingerprint: str

    def batch(self, request: BatchRequest) -> RawBatch: ...

    def held_out_captions(self, n: int) -> list[str]:
        """Captions never used for training, for sample grids and evaluation."""
        ...

    def held_out(self, start: int, n: int) -> RawBatch:
        """Held-out images (float32 in [0, 1]) with their captions, items ``start .. start + n``.

        The same items as :meth:`held_out_captions` in the same order, so evaluation can generate
        from caption i and compare against real image i. Random access lets ranks split the set.
        """
        ...


@runtime_checkable
class EncodingsSource(Protocol):
    """Optional extra of a :class:`DataSource` whose batches carry precomputed encodings.

    When ``provides_encodings`` is True the trainer builds the latent space and text encoder
    lazily (they load only if sampling or evaluation needs them) and takes the empty prompt from
    :meth:`empty_text`. ``precomputed_features`` maps each stored feature key to its per-sample
    shape, so a plugin can tell at setup that it will not need its teacher.
    """

    provides_encodings: bool
    precomputed_features: dict[str, tuple[int, ...]]

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored empty-prompt encoding, shapes (1, L, D) and (1, L)."""
        ...


class Tracker(Protocol):
    """Where metrics go. ``context`` distinguishes series with the same name (e.g.
    ``{"subset": "eval", "t_bin": "0.2-0.4"}``); trackers without contexts fold it into the name."""

    def start(self, hparams: dict[str, Any], total_steps: int, first_step: int) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None: ...
    def log_image(self, name: str, path: str, step: int) -> None: ...
    def close(self) -> None: ...


class Metric(Protocol):
    """An evaluation metric, split so that ranks share the work.

    ``features`` runs on every rank on its share of generated (and, when ``needs_reference``,
    real) images in [0, 1] with their prompts, returning one row per image; core gathers the rows
    from all ranks and rank 0 calls ``score`` once on the whole set.
    """

    name: str
    needs_reference: bool

    def features(self, images_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...

    def score(self, generated_ND: torch.Tensor, reference_ND: torch.Tensor | None) -> dict[str, float]: ...


#: ``predict(x_t, t, states, mask) -> model output`` with the sampling weights.
Predictor = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class Guidance(Protocol):
    """Replaces classifier-free guidance: returns the guided velocity for one Euler step."""

    def __call__(
        self,
        velocity: Callable[..., torch.Tensor],
        x_t_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        cond: tuple[torch.Tensor, torch.Tensor],
        uncond: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor: ...


@runtime_checkable
class PerSampleGuidance(Guidance, Protocol):
    """Optional extra of a :class:`Guidance` whose random draws belong to each sample.

    Before the first Euler step of a generation the sampler calls :meth:`for_samples` once with
    the generation's noise seed and one key per sample (``Trainer.generate`` passes the noise
    index of each prompt), and runs every step with the guidance it returns. Keying draws on the
    sample, not its batch position, keeps the core's promise that an image does not depend on the
    batch it is generated in. A plain :class:`Guidance` (without the method) is called as it is.
    """

    def for_samples(self, seed: int, sample_keys: Sequence[int]) -> Guidance: ...
