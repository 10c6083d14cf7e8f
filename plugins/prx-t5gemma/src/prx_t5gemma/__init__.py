"""Text encoder ``t5gemma``: the T5-Gemma-2B encoder's token states as the denoiser's text context (SPEC §3, §4).

PRX's default text encoder: the encoder half of ``google/t5gemma-2b-2b-ul2`` (2304-d), prompts
padded to 256 tokens with a mask. Only the encoder is loaded; the decoder's weights are skipped.

Importing this module stays cheap (no torch, no transformers): ``prx-run plugins`` and recipe
checks import every named plugin, and the core reads ``T5GemmaEncoderConfig.dim`` to size the denoiser
before any weights load. The heavy imports happen inside the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_t5gemma.encoder import T5GemmaTextEncoder

__all__ = ["INFO", "T5GemmaEncoderConfig", "prx_register_text_encoders"]

INFO = PluginInfo(
    name="t5gemma",
    summary="Text encoder: T5-Gemma-2B encoder token states (2304-d), 256 tokens with a mask",
    spec="SPEC §3 (baseline recipe), §4 (text encoders)",
    paper="https://arxiv.org/abs/2504.06225",
)


@dataclass(frozen=True)
class T5GemmaEncoderConfig:
    """The ``[text_encoder]`` table when ``use = "t5gemma"``."""

    #: Hub id or local directory: a T5Gemma checkpoint (encoder-decoder or encoder-only) or a
    #: PRXPipeline repo (with ``subfolder = "text_encoder"``, ``tokenizer_subfolder = "tokenizer"``).
    path: str = "google/t5gemma-2b-2b-ul2"
    #: Directory inside ``path`` holding the encoder's config and weights.
    subfolder: str = ""
    #: Directory inside ``path`` holding the tokenizer; empty: the same as ``subfolder``.
    tokenizer_subfolder: str = ""
    #: Tokens per prompt; every prompt is truncated or right-padded to exactly this length.
    max_length: int = 256
    #: Width of the token states. A plain field, not read from the weights, because the core
    #: sizes the denoiser's ``context_in_dim`` from it before anything loads; checked on load.
    dim: int = 2304

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name a hub id or a local directory, got an empty string")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


def _build(config: T5GemmaEncoderConfig, run: Any) -> T5GemmaTextEncoder:
    """Load the frozen encoder on the run's device, in the dtype the precision policy gives frozen towers."""
    from prx_t5gemma.encoder import T5GemmaTextEncoder, load_t5gemma

    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError("t5gemma: the precision policy must be built before the text encoder")
    model, tokenizer = load_t5gemma(
        config.path,
        config.subfolder,
        run.device,
        precision.frozen_dtype,
        dim=config.dim,
        tokenizer_subfolder=config.tokenizer_subfolder or config.subfolder,
    )
    return T5GemmaTextEncoder(model, tokenizer, max_length=config.max_length, dim=config.dim, device=run.device)


@hookimpl
def prx_register_text_encoders(registry: Any) -> None:
    registry.register("t5gemma", _build, T5GemmaEncoderConfig)
