"""Text encoder ``qwen3vl``: Qwen3-VL-Embedding-2B token states as the denoiser's text context (reference.md §4).

The alternative to T5-Gemma in reference.md §4: the language model of Qwen3-VL-Embedding-2B (2048-d), used
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
from prx_core.text_encoder_config import HubTextEncoderConfig, build_hub_text_encoder

if TYPE_CHECKING:
    from prx_qwen3vl.encoder import Qwen3VLTextEncoder

__all__ = ["INFO", "prx_check_recipe", "Qwen3VLEncoderConfig", "prx_register_text_encoders"]

INFO = PluginInfo(
    name="qwen3vl",
    summary="Text encoder: Qwen3-VL-Embedding-2B language-model token states (2048-d), text only, with a mask",
    spec="reference.md §4 (text encoders)",
    paper="https://arxiv.org/abs/2601.04720",
)


@dataclass(frozen=True, kw_only=True)
class Qwen3VLEncoderConfig(HubTextEncoderConfig):
    """The ``[text_encoder]`` table when ``use = "qwen3vl"``."""

    #: A Qwen3-VL checkpoint (full vision-language or text-only) or a PRXPixelPipeline repo; only
    #: the language model is built (the rest of the keys: :class:`prx_core.text_encoder_config.HubTextEncoderConfig`).
    path: str = "Qwen/Qwen3-VL-Embedding-2B"
    dim: int = 2048


def _build(config: Qwen3VLEncoderConfig, run: Any) -> Qwen3VLTextEncoder:
    from prx_qwen3vl.encoder import Qwen3VLTextEncoder, load_qwen3vl

    encoder: Qwen3VLTextEncoder = build_hub_text_encoder("qwen3vl", config, run, load_qwen3vl, Qwen3VLTextEncoder)
    return encoder


@hookimpl
def prx_register_text_encoders(registry: Any) -> None:
    registry.register("qwen3vl", _build, Qwen3VLEncoderConfig)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses a ``dim`` the weights do not have, when their ``config.json`` is on
    this machine (a local directory or the Hugging Face cache); nothing is downloaded."""
    from prx_core.recipe_checks import chosen_config, encoder_width_problems

    config: Qwen3VLEncoderConfig | None = chosen_config(recipe, "text_encoder", "qwen3vl")
    if config is None:
        return []
    # A vision-language checkpoint nests the language model's config; a text-only one is flat.
    nested = {"qwen3_vl": "text_config", "qwen3_vl_text": None}
    return encoder_width_problems("qwen3vl", config.dim, config.path, config.subfolder, nested)
