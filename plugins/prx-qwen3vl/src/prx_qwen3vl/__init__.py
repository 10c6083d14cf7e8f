"""Text encoder ``qwen3vl``: Qwen3-VL-Embedding-2B token states as the denoiser's text context (SPEC §4).

The alternative to T5-Gemma in SPEC §4: the language model of Qwen3-VL-Embedding-2B (2048-d), used
text-only. Only the language model is loaded; the vision tower's weights are skipped.

Importing this module stays cheap (no torch, no transformers): ``prx-run plugins`` and recipe
checks import every named plugin, and the core reads ``Qwen3VLEncoderConfig.dim`` to size the
denoiser before any weights load. The heavy imports happen inside the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_qwen3vl.encoder import Qwen3VLTextEncoder

__all__ = ["INFO", "Qwen3VLEncoderConfig", "prx_register_text_encoders"]

INFO = PluginInfo(
    name="qwen3vl",
    summary="Text encoder: Qwen3-VL-Embedding-2B language-model token states (2048-d), text only, with a mask",
    spec="SPEC §4 (text encoders)",
    paper="https://arxiv.org/abs/2601.04720",
)


@dataclass(frozen=True)
class Qwen3VLEncoderConfig:
    """The ``[text_encoder]`` table when ``use = "qwen3vl"``."""

    #: Hub id or local directory: a Qwen3-VL checkpoint (full vision-language or text-only) or a
    #: PRXPixelPipeline repo (with ``subfolder = "text_encoder"``, ``tokenizer_subfolder = "tokenizer"``).
    path: str = "Qwen/Qwen3-VL-Embedding-2B"
    #: Directory inside ``path`` holding the model's config and weights.
    subfolder: str = ""
    #: Directory inside ``path`` holding the tokenizer; empty: the same as ``subfolder``.
    tokenizer_subfolder: str = ""
    #: Tokens per prompt; every prompt is truncated or right-padded to exactly this length.
    max_length: int = 256
    #: Width of the token states. A plain field, not read from the weights, because the core
    #: sizes the denoiser's ``context_in_dim`` from it before anything loads; checked on load.
    dim: int = 2048

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path must name a hub id or a local directory, got an empty string")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


def _build(config: Qwen3VLEncoderConfig, run: Any) -> Qwen3VLTextEncoder:
    """Load the frozen language model on the run's device, in the precision policy's frozen dtype."""
    from prx_qwen3vl.encoder import Qwen3VLTextEncoder, load_qwen3vl

    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError("qwen3vl: the precision policy must be built before the text encoder")
    model, tokenizer = load_qwen3vl(
        config.path,
        config.subfolder,
        run.device,
        precision.frozen_dtype,
        dim=config.dim,
        tokenizer_subfolder=config.tokenizer_subfolder or config.subfolder,
    )
    return Qwen3VLTextEncoder(model, tokenizer, max_length=config.max_length, dim=config.dim, device=run.device)


@hookimpl
def prx_register_text_encoders(registry: Any) -> None:
    registry.register("qwen3vl", _build, Qwen3VLEncoderConfig)
