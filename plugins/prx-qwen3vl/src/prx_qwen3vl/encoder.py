"""The frozen Qwen3-VL language model behind the ``qwen3vl`` text-encoder slot entry."""

from __future__ import annotations

from typing import Any

import torch

from prx_core.text_encoding import PaddedTextEncoder

#: Where the language model's tensors live in each way a Qwen3-VL checkpoint is saved:
#: ``Qwen3VLForConditionalGeneration`` (the hub's) -> ``model.language_model.*``,
#: ``Qwen3VLModel`` -> ``language_model.*``, ``Qwen3VLTextModel`` (a PRXPixelPipeline's
#: ``text_encoder/``) -> no prefix.
_KEY_MAPPING = {r"^(?:model\.)?language_model\.": ""}


def _check_width(hidden_size: int, dim: int) -> None:
    if hidden_size != dim:
        raise ValueError(
            f"qwen3vl: [text_encoder] dim is {dim} but the checkpoint's language model hidden_size is {hidden_size}; "
            f"set dim = {hidden_size} (the denoiser's context_in_dim is sized from dim)"
        )


def load_qwen3vl(
    path: str,
    subfolder: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    dim: int | None = None,
    tokenizer_subfolder: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(language_model, tokenizer)``: the one loading code path, for hub ids and local directories.

    Only ``Qwen3VLTextModel`` is built, from a full vision-language checkpoint or a text-only one;
    the vision tower and LM head are never materialised (transformers lists them as UNEXPECTED in
    its load report). With ``dim`` given, the width is checked from ``config.json`` before any
    weight is read. The tokenizer comes from ``tokenizer_subfolder`` (default: ``subfolder``). The
    model comes back frozen (eval, no gradients) on ``device`` in ``dtype``.
    """
    try:
        from transformers import AutoConfig, AutoTokenizer, Qwen3VLTextModel
    except ImportError as err:
        raise ImportError("qwen3vl needs transformers with Qwen3-VL: pip install 'transformers>=4.57'") from err

    where = f"'{path}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    try:
        config = AutoConfig.from_pretrained(path, subfolder=subfolder)
        # Checked before building anything: a foreign config would otherwise become a
        # default-sized random model with every weight reported missing.
        if config.model_type == "qwen3_vl":
            config = config.text_config
        elif config.model_type != "qwen3_vl_text":
            raise ValueError(f"qwen3vl: {where} holds a '{config.model_type}' model, not a Qwen3-VL ('qwen3_vl') one")
        if dim is not None:
            _check_width(int(config.hidden_size), dim)
        tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder=subfolder if tokenizer_subfolder is None else tokenizer_subfolder
        )
        # dtype at load time, not a later .to(dtype): that would also cast the fp32 RoPE frequency
        # buffers, which transformers deliberately keeps in full precision.
        model, info = Qwen3VLTextModel.from_pretrained(
            path, subfolder=subfolder, config=config, key_mapping=_KEY_MAPPING, dtype=dtype, output_loading_info=True
        )
    except OSError as err:
        raise OSError(f"qwen3vl: cannot load a text encoder from {where}: {err}") from err
    missing = sorted(info["missing_keys"])
    if missing:
        # Missing tensors are silently random-initialised by transformers; a text encoder with
        # random layers would train a model on noise without any visible error.
        raise ValueError(
            f"qwen3vl: {where} has no weights for {len(missing)} language-model tensors, e.g. {missing[:3]}"
        )
    return model.to(device).eval().requires_grad_(False), tokenizer


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
        _check_width(int(model.config.hidden_size), dim)
        super().__init__(model, tokenizer, max_length, dim, device)
