"""The frozen T5-Gemma encoder behind the ``t5gemma`` text-encoder slot entry."""

from __future__ import annotations

import copy
from typing import Any

import torch

from prx_core.text_encoding import PaddedTextEncoder


def _check_width(hidden_size: int, dim: int) -> None:
    if hidden_size != dim:
        raise ValueError(
            f"t5gemma: [text_encoder] dim is {dim} but the checkpoint's encoder hidden_size is {hidden_size}; "
            f"set dim = {hidden_size} (the denoiser's context_in_dim is sized from dim)"
        )


#: Where the encoder's tensors live in each way a T5Gemma checkpoint is saved: the hub's
#: ``T5GemmaForConditionalGeneration`` -> ``model.encoder.*``, ``T5GemmaModel`` and
#: ``T5GemmaEncoderModel`` -> ``encoder.*``, a bare ``T5GemmaEncoder`` (a PRXPipeline's
#: ``text_encoder/``) -> no prefix. Decoder tensors match nothing and are never read.
_KEY_MAPPING = {r"^(?:model\.)?encoder\.": ""}


def load_t5gemma(
    path: str,
    subfolder: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    dim: int | None = None,
    tokenizer_subfolder: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(encoder, tokenizer)``: the one loading code path, for hub ids and local directories.

    Builds only ``T5GemmaEncoder`` (the module diffusers' PRXPipeline uses as its text encoder),
    from any checkpoint layout in ``_KEY_MAPPING``; the decoder's tensors are never materialised
    (transformers lists them as UNEXPECTED in its load report). With ``dim`` given, the width is
    checked from ``config.json`` before any weight is read. The tokenizer comes from
    ``tokenizer_subfolder`` (default: ``subfolder``). The model comes back frozen (eval, no
    gradients) on ``device`` in ``dtype``.
    """
    try:
        from transformers import AutoConfig, AutoTokenizer
        from transformers.models.t5gemma.modeling_t5gemma import T5GemmaEncoder
    except ImportError as err:
        raise ImportError("t5gemma needs transformers with T5Gemma: pip install 'transformers>=4.56'") from err

    where = f"'{path}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    try:
        config = AutoConfig.from_pretrained(path, subfolder=subfolder)
        # Checked before building anything: a foreign config would otherwise become a
        # default-sized (2B) random model with every weight reported missing.
        if config.model_type == "t5gemma":
            config = config.encoder
        elif config.model_type != "t5_gemma_module":
            raise ValueError(f"t5gemma: {where} holds a '{config.model_type}' model, not a T5Gemma ('t5gemma') one")
        if dim is not None:
            _check_width(int(config.hidden_size), dim)
        tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder=subfolder if tokenizer_subfolder is None else tokenizer_subfolder
        )
        # dtype at load time, not a later .to(dtype): that would also cast the fp32 RoPE frequency
        # buffers, which transformers deliberately keeps in full precision.
        model, info = T5GemmaEncoder.from_pretrained(
            path, subfolder=subfolder, config=config, key_mapping=_KEY_MAPPING, dtype=dtype, output_loading_info=True
        )
    except OSError as err:
        raise OSError(f"t5gemma: cannot load a text encoder from {where}: {err}") from err
    # transformers remembers the key mapping and reverses it on save_pretrained, which cannot undo a
    # regex (it writes keys like "?encoder.layers..."); the mapping is only for reading the hub's
    # layouts, so saving (e.g. a PRXPipeline's text_encoder/) must write the module's own names.
    model._weight_conversions = []
    missing = sorted(info["missing_keys"])
    if missing:
        # Missing tensors are silently random-initialised by transformers; a text encoder with
        # random layers would train a model on noise without any visible error.
        raise ValueError(f"t5gemma: {where} has no weights for {len(missing)} encoder tensors, e.g. {missing[:3]}")
    return model.to(device).eval().requires_grad_(False), tokenizer


class T5GemmaTextEncoder(PaddedTextEncoder):
    """Prompts to right-padded token states + mask, following :class:`prx_core.slots.TextEncoder`.

    States come out in the model's (frozen) dtype, the one the precision policy chose; the trainer
    casts them where it needs another. Positions past each prompt's last token are exactly zero.
    """

    name = "t5gemma"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, dim: int, device: torch.device) -> None:
        _check_width(int(model.config.hidden_size), dim)
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
