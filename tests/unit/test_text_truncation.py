"""Silent tokenizer truncation is counted (and reaches the trainer's metrics)."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.text_cache import CachedTextEncoder  # noqa: E402


def test_prompts_longer_than_max_length_are_counted_once_each() -> None:
    from prx_minilm.encoder import MiniLMTextEncoder, load_minilm

    model, tokenizer = load_minilm("", "", torch.device("cpu"), torch.float32)
    encoder = CachedTextEncoder(MiniLMTextEncoder(model, tokenizer, max_length=8, dim=384, device=torch.device("cpu")))
    short, long = "a red circle", "a large red circle in the top left corner on a gray background"
    assert len(tokenizer(long)["input_ids"]) > 8 >= len(tokenizer(short)["input_ids"])
    encoder.encode([short, long, long])  # the repeat is a cache hit, not a second cut
    assert encoder.stats() == {"text/truncated_prompts": 1.0}
    encoder.encode(["x " * 20])
    assert encoder.stats()["text/truncated_prompts"] == 2.0
