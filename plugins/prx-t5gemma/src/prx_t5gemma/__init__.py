"""Text encoder ``t5gemma``: T5-Gemma-2B encoder token states as the denoiser's text context (reference.md §3, §4).

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
from prx_core.text_encoder_config import HubTextEncoderConfig, build_hub_text_encoder

if TYPE_CHECKING:
    from prx_t5gemma.encoder import T5GemmaTextEncoder

__all__ = ["INFO", "prx_check_recipe", "T5GemmaEncoderConfig", "prx_register_text_encoders"]

INFO = PluginInfo(
    name="t5gemma",
    summary="Text encoder: T5-Gemma-2B encoder token states (2304-d), 256 tokens with a mask",
    spec="reference.md §3 (baseline recipe), §4 (text encoders)",
    paper="https://arxiv.org/abs/2504.06225",
)


@dataclass(frozen=True, kw_only=True)
class T5GemmaEncoderConfig(HubTextEncoderConfig):
    """The ``[text_encoder]`` table when ``use = "t5gemma"``."""

    #: A T5Gemma checkpoint (encoder-decoder or encoder-only) or a PRXPipeline repo; only the
    #: encoder is built (the rest of the keys: :class:`prx_core.text_encoder_config.HubTextEncoderConfig`).
    path: str = "google/t5gemma-2b-2b-ul2"
    dim: int = 2304


def _build(config: T5GemmaEncoderConfig, run: Any) -> T5GemmaTextEncoder:
    from prx_t5gemma.encoder import T5GemmaTextEncoder, load_t5gemma

    encoder: T5GemmaTextEncoder = build_hub_text_encoder("t5gemma", config, run, load_t5gemma, T5GemmaTextEncoder)
    return encoder


@hookimpl
def prx_register_text_encoders(registry: Any) -> None:
    registry.register("t5gemma", _build, T5GemmaEncoderConfig)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses a ``dim`` the weights do not have, when their ``config.json`` is on
    this machine (a local directory or the Hugging Face cache); nothing is downloaded."""
    from prx_core.recipe_checks import chosen_config, encoder_width_problems

    config: T5GemmaEncoderConfig | None = chosen_config(recipe, "text_encoder", "t5gemma")
    if config is None:
        return []
    # An encoder-decoder checkpoint nests the encoder's config; a bare T5GemmaEncoder's is flat.
    nested = {"t5gemma": "encoder", "t5_gemma_module": None}
    return encoder_width_problems("t5gemma", config.dim, config.path, config.subfolder, nested)
