"""A tiny, randomly initialised Qwen3-VL checkpoint with a matching tokenizer, for offline tests.

The real weights cannot be downloaded in tests, so tests save this instead and load it back
through :func:`prx_qwen3vl.encoder.load_qwen3vl`, the same code that loads the hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

#: Enough words for the synthetic-shapes captions and the tests' prompts; anything else is <unk>.
WORDS = (
    "a an and the of on in at to with is top bottom left right center small large much longer caption "
    "describing resting background circle square triangle red green blue yellow magenta cyan orange white "
    "black gray navy brown photo cat dog , ."
).split()
#: Qwen's special tokens (pad is <|endoftext|>, eos <|im_end|>), then <unk> for the word-level model.
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)

Layout = Literal["conditional_generation", "model", "text"]


def tiny_tokenizer() -> object:
    """A word-level tokenizer that, like Qwen's, adds no special tokens itself.

    It pads on the left, so tests show the encoder right-pads whatever the tokenizer's default.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIALS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
    )


def save_tiny_qwen3vl(
    directory: Path,
    subfolder: str = "",
    *,
    hidden_size: int = 32,
    layout: Layout = "conditional_generation",
    tokenizer_subfolder: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a 2-layer Qwen3-VL under ``directory / subfolder``, its tokenizer under ``directory /
    tokenizer_subfolder`` (default: next to the model); returns the model's directory.

    ``layout`` picks the saved class: ``conditional_generation`` (the hub's: vision tower, language
    model under ``model.language_model.*``, LM head), ``model`` (``Qwen3VLModel``) or ``text``
    (``Qwen3VLTextModel`` alone, as in a PRXPixelPipeline's ``text_encoder/``).
    """
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLModel,
    )

    ids = {token: i for i, token in enumerate(SPECIALS)}
    text = {
        "vocab_size": len(SPECIALS) + len(WORDS),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 64,
        # Interleaved multimodal RoPE as in Qwen3-VL; the sections split head_dim / 2 = 8.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": 4,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0],
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model: Any
    if layout == "conditional_generation":
        model = Qwen3VLForConditionalGeneration(config)
    elif layout == "model":
        model = Qwen3VLModel(config)
    elif layout == "text":
        # Built inside the full model, so the same seed gives the same language-model weights.
        model = Qwen3VLForConditionalGeneration(config).model.language_model
    else:
        raise ValueError(f"layout must be 'conditional_generation', 'model' or 'text', got {layout!r}")
    target = Path(directory) / subfolder
    model.save_pretrained(target)
    tiny_tokenizer().save_pretrained(  # type: ignore[attr-defined]
        target if tokenizer_subfolder is None else Path(directory) / tokenizer_subfolder
    )
    return target
