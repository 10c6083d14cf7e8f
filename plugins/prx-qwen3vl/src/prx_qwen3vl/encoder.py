"""The frozen Qwen3-VL language model behind the ``qwen3vl`` text-encoder slot entry."""

from __future__ import annotations

from typing import Any

import torch

from prx_core.text_encoding import PaddedTextEncoder, check_text_width, load_text_submodule

#: Where the language model's tensors live in each way a Qwen3-VL checkpoint is saved:
#: ``Qwen3VLForConditionalGeneration`` (the hub's) -> ``model.language_model.*``,
#: ``Qwen3VLModel`` -> ``language_model.*``, ``Qwen3VLTextModel`` (a PRXPixelPipeline's
#: ``text_encoder/``) -> no prefix.
_KEY_MAPPING = {r"^(?:model\.)?language_model\.": ""}


def _text_config(config: Any, where: str) -> Any:
    if config.model_type == "qwen3_vl":
        return config.text_config
    if config.model_type != "qwen3_vl_text":
        raise ValueError(f"qwen3vl: {where} holds a '{config.model_type}' model, not a Qwen3-VL ('qwen3_vl') one")
    return config


def load_qwen3vl(
    path: str,
    subfolder: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    dim: int | None = None,
    tokenizer_subfolder: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(language_model, tokenizer)`` from a hub id or local directory.

    Only ``Qwen3VLTextModel`` is built, from a full vision-language checkpoint or a text-only one;
    the vision tower and LM head are never materialised. Goes through core's shared loader
    (:func:`prx_core.text_encoding.load_text_submodule`).
    """
    try:
        from transformers import Qwen3VLTextModel
    except ImportError as err:
        raise ImportError("qwen3vl needs transformers with Qwen3-VL: pip install 'transformers>=4.57'") from err
    return load_text_submodule(
        "qwen3vl",
        Qwen3VLTextModel,
        path,
        subfolder,
        device,
        dtype,
        select_config=_text_config,
        key_mapping=_KEY_MAPPING,
        dim=dim,
        tokenizer_subfolder=tokenizer_subfolder,
        part="language-model",
    )


class Qwen3VLTextEncoder(PaddedTextEncoder):
    """Prompts to right-padded token states + mask, following :class:`prx_core.slots.TextEncoder`.

    Prompts are tokenised as they are, with no chat template and no added special token (Qwen's
    tokenizer adds none), as diffusers' PRXPixelPipeline does; so ``""`` has no real token and
    an all-False mask. States come out in the model's (frozen) dtype; positions past each
    prompt's last token are exactly zero.
    """

    name = "qwen3vl"
    forward_kwargs = {"use_cache": False}  # no KV cache: one forward per batch

    def __init__(self, model: Any, tokenizer: Any, max_length: int, dim: int, device: torch.device) -> None:
        check_text_width("qwen3vl", int(model.config.hidden_size), dim)
        super().__init__(model, tokenizer, max_length, dim, device)
