"""What every Hugging Face text-encoder plugin's ``[text_encoder]`` table shares, and its factory.

Torch-free on purpose, like :mod:`prx_core.data.source_config`: a plugin's config subclasses
:class:`HubTextEncoderConfig` (setting its own ``path`` and ``dim`` defaults), and plugin modules
are imported by ``prx-run plugins`` and recipe checks, which must stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: Tokens per prompt in the PRX baseline (reference.md §3).
DEFAULT_MAX_LENGTH = 256
#: A training batch's text is cut to its longest caption rounded up to this many tokens.
DEFAULT_PAD_MULTIPLE = 64


def check_pad_multiple(value: int) -> None:
    if value < 0:
        raise ValueError(f"pad_multiple must be >= 0 (0: always pad to max_length), got {value}")


@dataclass(frozen=True, kw_only=True)
class HubTextEncoderConfig:
    """``[text_encoder]`` keys of an encoder loaded from a hub id or a local directory."""

    #: Hub id or local directory: the model's own checkpoint, or a diffusers pipeline repo (with
    #: ``subfolder = "text_encoder"`` and ``tokenizer_subfolder = "tokenizer"``).
    path: str
    #: Directory inside ``path`` holding the model's config and weights.
    subfolder: str = ""
    #: Directory inside ``path`` holding the tokenizer; empty: the same as ``subfolder``.
    tokenizer_subfolder: str = ""
    #: Tokens per prompt; every prompt is truncated or right-padded to exactly this length.
    max_length: int = DEFAULT_MAX_LENGTH
    #: Width of the token states. A plain field, not read from the weights, because the core
    #: sizes the denoiser's ``context_in_dim`` from it before anything loads; checked on load.
    dim: int
    #: Training cuts each batch's text to its longest caption rounded up to this many tokens (at
    #: most ``max_length``): padding is masked, so the result is the same up to rounding, and
    #: attention over 256 positions for 40-token captions is wasted work. 0: always ``max_length``.
    pad_multiple: int = DEFAULT_PAD_MULTIPLE

    def __post_init__(self) -> None:
        check_pad_multiple(self.pad_multiple)
        if not self.path:
            raise ValueError("path must name a hub id or a local directory, got an empty string")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")


def build_hub_text_encoder(
    name: str, config: HubTextEncoderConfig, run: Any, load: Callable[..., tuple[Any, Any]], encoder: Callable[..., Any]
) -> Any:
    """Load the frozen model on the run's device, in the dtype the precision policy gives frozen
    towers, and wrap it: ``load(path, subfolder, device, dtype, dim=, tokenizer_subfolder=)``
    returns ``(model, tokenizer)``, and ``encoder(model, tokenizer, max_length=, dim=, device=)``
    is the plugin's :class:`prx_core.text_encoding.PaddedTextEncoder` subclass."""
    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError(f"{name}: the precision policy must be built before the text encoder")
    model, tokenizer = load(
        config.path,
        config.subfolder,
        run.device,
        precision.frozen_dtype,
        dim=config.dim,
        tokenizer_subfolder=config.tokenizer_subfolder or config.subfolder,
    )
    return encoder(model, tokenizer, max_length=config.max_length, dim=config.dim, device=run.device)
