"""A tiny, randomly initialised T5Gemma checkpoint with a matching tokenizer, for offline tests.

The real weights cannot be downloaded in tests, so tests save this instead and load it back
through :func:`prx_t5gemma.encoder.load_t5gemma`, the same code that loads the hub checkpoint.
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
#: Gemma's ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3 (the T5GemmaConfig defaults).
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")

Layout = Literal["conditional_generation", "encoder_model", "encoder"]


def tiny_tokenizer() -> object:
    """A word-level tokenizer that, like Gemma's, prepends ``<bos>`` and pads with ``<pad>`` (id 0) on the left."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIALS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


def save_tiny_t5gemma(
    directory: Path,
    subfolder: str = "",
    *,
    hidden_size: int = 32,
    layout: Layout = "conditional_generation",
    tokenizer_subfolder: str | None = None,
    seed: int = 0,
) -> Path:
    """Save a 2-layer T5Gemma under ``directory / subfolder``, its tokenizer under ``directory /
    tokenizer_subfolder`` (default: next to the model); returns the model's directory.

    ``layout`` picks the saved class: ``conditional_generation`` (the hub's encoder-decoder,
    ``model.encoder.*`` and ``model.decoder.*``), ``encoder_model`` (``T5GemmaEncoderModel``,
    ``encoder.*``) or ``encoder`` (a bare ``T5GemmaEncoder``; note that a PRXPipeline's ``text_encoder/`` folder
    carries the combined T5Gemma config, see ``pipeline_text_components``).
    """
    from transformers import T5GemmaConfig, T5GemmaEncoderModel, T5GemmaForConditionalGeneration

    module = {
        "vocab_size": len(SPECIALS) + len(WORDS),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        # Shorter than the test prompts, so the sliding-attention layer really slides.
        "sliding_window": 4,
        "max_position_embeddings": 64,
    }
    config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=module["vocab_size"])
    torch.manual_seed(seed)
    model: Any
    if layout == "conditional_generation":
        model = T5GemmaForConditionalGeneration(config)
    elif layout == "encoder_model":
        config.is_encoder_decoder = False
        model = T5GemmaEncoderModel(config)
    elif layout == "encoder":
        model = T5GemmaForConditionalGeneration(config).get_encoder()
    else:
        raise ValueError(f"layout must be 'conditional_generation', 'encoder_model' or 'encoder', got {layout!r}")
    target = Path(directory) / subfolder
    model.save_pretrained(target)
    tiny_tokenizer().save_pretrained(  # type: ignore[attr-defined]
        target if tokenizer_subfolder is None else Path(directory) / tokenizer_subfolder
    )
    return target
