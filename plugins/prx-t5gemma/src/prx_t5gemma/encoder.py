"""The frozen T5-Gemma encoder behind the ``t5gemma`` text-encoder slot entry."""

from __future__ import annotations

import copy
from typing import Any

import torch

from prx_core.text_encoding import PaddedTextEncoder, check_text_width, load_text_submodule

#: Where the encoder's tensors live in each way a T5Gemma checkpoint is saved: the hub's
#: ``T5GemmaForConditionalGeneration`` -> ``model.encoder.*``, ``T5GemmaModel`` and
#: ``T5GemmaEncoderModel`` -> ``encoder.*``, a bare ``T5GemmaEncoder`` (a PRXPipeline's
#: ``text_encoder/``) -> no prefix. Decoder tensors match nothing and are never read.
_KEY_MAPPING = {r"^(?:model\.)?encoder\.": ""}


def _encoder_config(config: Any, where: str) -> Any:
    if config.model_type == "t5gemma":
        return config.encoder
    if config.model_type != "t5_gemma_module":
        raise ValueError(f"t5gemma: {where} holds a '{config.model_type}' model, not a T5Gemma ('t5gemma') one")
    return config


def load_t5gemma(
    path: str,
    subfolder: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    dim: int | None = None,
    tokenizer_subfolder: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(encoder, tokenizer)`` from a hub id or local directory.

    Builds only ``T5GemmaEncoder`` (the module diffusers' PRXPipeline uses as its text encoder),
    from any checkpoint layout in ``_KEY_MAPPING``, through core's shared loader
    (:func:`prx_core.text_encoding.load_text_submodule`).
    """
    try:
        from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder
    except ImportError as err:
        raise ImportError("t5gemma needs transformers with T5Gemma: pip install 'transformers>=4.56'") from err
    return load_text_submodule(
        "t5gemma",
        T5GemmaEncoder,
        path,
        subfolder,
        device,
        dtype,
        select_config=_encoder_config,
        key_mapping=_KEY_MAPPING,
        dim=dim,
        tokenizer_subfolder=tokenizer_subfolder,
        part="encoder",
    )


class T5GemmaTextEncoder(PaddedTextEncoder):
    """Prompts to right-padded token states + mask, following :class:`prx_core.slots.TextEncoder`.

    States come out in the model's (frozen) dtype, the one the precision policy chose; the trainer
    casts them where it needs another. Positions past each prompt's last token are exactly zero.
    """

    name = "t5gemma"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, dim: int, device: torch.device) -> None:
        check_text_width("t5gemma", int(model.config.hidden_size), dim)
        super().__init__(model, tokenizer, max_length, dim, device)

    def pipeline_text_components(self) -> tuple[Any, Any]:
        """``(T5GemmaEncoder, tokenizer)`` for a ``PRXPipeline`` export
        (:class:`prx_core.slots.PipelineTextEncoder`).

        The pipeline tokenizes with the tokenizer's own defaults, so the tokenizer returned is a
        copy set to what :meth:`encode` passes explicitly: right padding to ``max_length``.

        diffusers loads a PRXPipeline's ``text_encoder/`` by reading a composite ``T5GemmaConfig``
        and building the encoder from its ``.encoder``; a bare module config there would build a
        default-sized (2B) encoder. So the model returned is a shallow copy (same parameters) whose
        config is that composite, leaving this encoder's own config untouched.
        """
        from transformers import T5GemmaConfig

        module = self.model.config.to_dict()
        exported = copy.copy(self.model)
        exported.config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=self.model.config.vocab_size)
        tokenizer = copy.deepcopy(self.tokenizer)
        tokenizer.padding_side = "right"
        tokenizer.model_max_length = self.max_length
        return exported, tokenizer
