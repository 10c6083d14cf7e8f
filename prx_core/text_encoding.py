"""A base for text encoders built on a Hugging Face tokenizer and encoder model.

It holds what every such encoder must get right: right padding to exactly ``max_length``, a bool
mask, padded positions zeroed (so padding content never reaches the denoiser, even through an
attention kernel that ignores the mask), the empty prompt encoded once and cached, and no autograd
(``no_grad`` rather than ``inference_mode``: the states feed the denoiser's backward graph).
A plugin subclasses it, sets ``name`` (used in messages) and, where the model needs them, extra
``forward_kwargs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch


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

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to ``(states_BLD, mask_BL)`` with L == max_length; mask is bool, True = real token."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        if not prompts:
            states_0LD = torch.zeros(0, self.max_length, self.dim, dtype=self.model.dtype, device=self.device)
            return states_0LD, torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device)
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
        ids_BL = batch["input_ids"].to(self.device)
        mask_BL = batch["attention_mask"].to(self.device).bool()
        states_BLD = self.model(input_ids=ids_BL, attention_mask=mask_BL, **self.forward_kwargs).last_hidden_state
        return states_BLD.masked_fill(~mask_BL[..., None], 0.0), mask_BL

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of ``""``, shapes (1, L, D) and (1, L); computed on first use, then cached.

        Caption dropout and classifier-free guidance ask for it every step. Callers must not modify it.
        """
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty
