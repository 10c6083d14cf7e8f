"""A base for text encoders built on a Hugging Face tokenizer and encoder model.

It holds what every such encoder must get right: right padding to exactly ``max_length``, a bool
mask, padded positions zeroed (so padding content never reaches the denoiser, even through an
attention kernel that ignores the mask), the empty prompt encoded once and cached, and no autograd
(``no_grad`` rather than ``inference_mode``: the states feed the denoiser's backward graph).
A plugin subclasses it, sets ``name`` (used in messages) and, where the model needs them, extra
``forward_kwargs``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from prx_core.transfer import to_device

logger = logging.getLogger("prx.text")


class PaddedTextEncoder:
    """Prompts to right-padded token states + mask, following :class:`prx_core.slots.TextEncoder`.

    States come out in the model's (frozen) dtype, the one the precision policy chose; the trainer
    casts them where it needs another.
    """

    name: ClassVar[str] = "text encoder"
    forward_kwargs: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, model: Any, tokenizer: Any, max_length: int, dim: int, device: torch.device) -> None:
        positions = int(model.config.max_position_embeddings)
        if max_length > positions:
            raise ValueError(f"{self.name}: max_length {max_length} exceeds the model's {positions} positions")
        if tokenizer.pad_token is None:
            raise ValueError(f"{self.name}: the tokenizer has no pad token, so prompts cannot be padded")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = dim
        self.device = torch.device(device)
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None
        #: Prompts longer than ``max_length`` tokens, cut silently by the tokenizer (counted here).
        self.truncated_prompts = 0

    def stats(self) -> dict[str, float]:
        return {"text/truncated_prompts": float(self.truncated_prompts)}

    def _count_truncated(self, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, padding=False)["input_ids"]]
        cut = [(n, p) for n, p in zip(lengths, prompts, strict=True) if n > self.max_length]
        if cut and not self.truncated_prompts:
            logger.warning(
                "%s: a prompt of %d tokens is cut to max_length %d (counted as text/truncated_prompts; further "
                "cuts are only counted): %.80s…",
                self.name,
                cut[0][0],
                self.max_length,
                cut[0][1],
            )
        self.truncated_prompts += len(cut)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to ``(states_BLD, mask_BL)`` with L == max_length; mask is bool, True = real token."""
        states_BLD, mask_BL, _ = self.encode_with_lengths(prompts)
        return states_BLD, mask_BL

    @torch.no_grad()
    def encode_with_lengths(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """:meth:`encode` plus each prompt's token count, known on the host from the tokenizer."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        if not prompts:
            states_0LD = torch.zeros(0, self.max_length, self.dim, dtype=self.model.dtype, device=self.device)
            return states_0LD, torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device), []
        # Right padding whatever the tokenizer's default (Gemma's pads left): real tokens then keep
        # positions 0..n-1 as in an unpadded forward, whatever the amount of padding.
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            padding_side="right",
            return_tensors="pt",
        )
        # Only a prompt that fills every position can have been cut: re-tokenise just those.
        lengths = batch["attention_mask"].sum(1).tolist()
        full = [p for p, n in zip(prompts, lengths, strict=True) if n == self.max_length]
        if full:
            self._count_truncated(full)
        # Ids and mask travel in one copy (pinned, non-blocking on CUDA), not one copy each.
        ids_and_mask_2BL = to_device(torch.stack([batch["input_ids"], batch["attention_mask"]]), self.device)
        ids_BL, mask_BL = ids_and_mask_2BL[0], ids_and_mask_2BL[1].bool()
        # No padding anywhere (known here, on the host): no mask, so transformers need not read the
        # device to find out that it could skip it.
        attention_BL = mask_BL if min(lengths) < self.max_length else None
        states_BLD = self.model(input_ids=ids_BL, attention_mask=attention_BL, **self.forward_kwargs).last_hidden_state
        return states_BLD.masked_fill(~mask_BL[..., None], 0.0), mask_BL, [int(n) for n in lengths]

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of ``""``, shapes (1, L, D) and (1, L); computed on first use, then cached.

        Caption dropout and classifier-free guidance ask for it every step. Callers must not modify it.
        """
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty


def check_text_width(label: str, hidden_size: int, dim: int) -> None:
    """The recipe's ``dim`` sized the denoiser before loading; the checkpoint must agree."""
    if hidden_size != dim:
        raise ValueError(
            f"{label}: [text_encoder] dim is {dim} but the checkpoint's hidden_size is {hidden_size}; "
            f"set dim = {hidden_size} (the denoiser's context_in_dim is sized from dim)"
        )


def load_text_submodule(
    label: str,
    model_class: Any,
    path: str,
    subfolder: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    select_config: Callable[[Any, str], Any],
    key_mapping: Mapping[str, str],
    dim: int | None = None,
    tokenizer_subfolder: str | None = None,
    part: str = "text-model",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for the text part of a larger transformers checkpoint.

    The one loading path for hub ids and local directories, shared by the text-encoder plugins.
    ``select_config(config, where)`` returns the sub-config ``model_class`` is built from (raising
    ValueError for a foreign checkpoint); ``key_mapping`` maps each checkpoint layout's tensor
    names onto the module's, so tensors of other parts (a decoder, a vision tower) are never
    materialised. With ``dim`` given, the width is checked from the config before any weight is
    read. The tokenizer comes from ``tokenizer_subfolder`` (default: ``subfolder``). The model
    comes back frozen (eval, no gradients) on ``device`` in ``dtype``. ``part`` names the module's
    tensors in the error for missing weights.
    """
    from transformers import AutoConfig, AutoTokenizer

    where = f"'{path}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    try:
        # Checked before building anything: a foreign config would otherwise become a
        # default-sized random model with every weight reported missing.
        config = select_config(AutoConfig.from_pretrained(path, subfolder=subfolder), where)
        if dim is not None:
            check_text_width(label, int(config.hidden_size), dim)
        tokenizer = AutoTokenizer.from_pretrained(
            path, subfolder=subfolder if tokenizer_subfolder is None else tokenizer_subfolder
        )
        # dtype at load time, not a later .to(dtype): that would also cast the fp32 RoPE frequency
        # buffers, which transformers deliberately keeps in full precision.
        model, info = model_class.from_pretrained(
            path,
            subfolder=subfolder,
            config=config,
            key_mapping=dict(key_mapping),
            dtype=dtype,
            output_loading_info=True,
        )
    except OSError as err:
        raise OSError(f"{label}: cannot load a text encoder from {where}: {err}") from err
    # transformers remembers the key mapping and reverses it on save_pretrained, which cannot undo a
    # regex (it writes keys like "?encoder.layers..."); the mapping is only for reading the hub's
    # layouts, so saving (e.g. a PRXPipeline's text_encoder/) must write the module's own names.
    model._weight_conversions = []
    missing = sorted(info["missing_keys"])
    if missing:
        # Missing tensors are silently random-initialised by transformers; a text encoder with
        # random layers would train a model on noise without any visible error.
        raise ValueError(f"{label}: {where} has no weights for {len(missing)} {part} tensors, e.g. {missing[:3]}")
    return model.to(device).eval().requires_grad_(False), tokenizer
