"""The text cache encodes a batch's misses in one forward, and each row equals the caption's own
encoding: with the real MiniLM encoder and with a tiny random T5Gemma, whatever the padding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from prx_core.text_cache import CachedTextEncoder, padded_length

CAPTIONS = [
    "a red circle at the top left",
    "",
    "a much longer caption describing a blue square resting on a gray background",
    "cat",
    "a red circle at the top left",  # a repeat inside the batch
]


@pytest.fixture(scope="module")
def minilm() -> Any:
    from prx_minilm.encoder import MiniLMTextEncoder, load_minilm

    model, tokenizer = load_minilm("", "", torch.device("cpu"), torch.float32)
    return lambda max_length: MiniLMTextEncoder(model, tokenizer, max_length, 384, torch.device("cpu"))


@pytest.fixture(scope="module")
def t5gemma(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from prx_t5gemma.encoder import T5GemmaTextEncoder, load_t5gemma
    from prx_t5gemma.testing import save_tiny_t5gemma

    directory = save_tiny_t5gemma(tmp_path_factory.mktemp("t5gemma"))
    model, tokenizer = load_t5gemma(str(directory), "", torch.device("cpu"), torch.float32, dim=32)
    return lambda max_length: T5GemmaTextEncoder(model, tokenizer, max_length, 32, torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Bitwise comparisons: keep matmul reductions split the same way in every forward.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["minilm", "t5gemma"])
def test_batched_misses_equal_each_captions_own_encoding(name: str, request: pytest.FixtureRequest) -> None:
    encoder = request.getfixturevalue(name)(24)
    cache = CachedTextEncoder(encoder)
    states_BLD, mask_BL = cache.encode(CAPTIONS)
    assert cache.forwards == 1  # the four distinct misses went through the encoder together
    assert states_BLD.shape == (len(CAPTIONS), 24, encoder.dim) and mask_BL.dtype == torch.bool
    for row, caption in enumerate(CAPTIONS):
        alone_1LD, alone_mask_1L = encoder.encode([caption])  # batch of one, the reference
        assert torch.equal(mask_BL[row], alone_mask_1L[0])
        torch.testing.assert_close(states_BLD[row], alone_1LD[0], rtol=0, atol=0 if name == "minilm" else 1e-6)
    # A second call is all hits: no forward, the same states.
    again_BLD, _ = cache.encode(list(reversed(CAPTIONS)))
    assert cache.forwards == 1 and cache.hits == 1 + len(CAPTIONS)  # "" hit the first time too
    assert torch.equal(again_BLD, states_BLD.flip(0))


@pytest.mark.parametrize("name", ["minilm", "t5gemma"])
def test_padding_does_not_change_a_captions_states(name: str, request: pytest.FixtureRequest) -> None:
    # Right padding to 12 or to 40 positions: the attention mask hides the padding, so the real
    # tokens come out the same and the padding itself is zero.
    short, long = request.getfixturevalue(name)(12), request.getfixturevalue(name)(40)
    short_BLD, short_mask = short.encode(CAPTIONS[:2])
    long_BLD, long_mask = long.encode(CAPTIONS[:2])
    torch.testing.assert_close(long_BLD[:, :12], short_BLD, rtol=1e-5, atol=1e-5)
    assert torch.equal(long_mask[:, :12], short_mask) and not long_mask[:, 12:].any()
    assert long_BLD[:, 12:].abs().max() == 0


def test_trimmed_batch_is_the_full_batch_cut_to_the_longest_caption_rounded_up(minilm: Any) -> None:
    encoder = minilm(32)
    cache = CachedTextEncoder(encoder)
    prompts = ["cat", "a red circle at the top left"]
    # MiniLM wraps text in [CLS] … [SEP]: "cat" is 3 tokens, the circle caption 9.
    trimmed_BLD, trimmed_mask, lengths = cache.encode_batch(prompts, pad_multiple=4)
    assert lengths == [3, 9] and trimmed_BLD.shape[1] == 12  # 9 rounded up to a multiple of 4
    full_BLD, full_mask = encoder.encode(prompts)
    assert torch.equal(trimmed_BLD, full_BLD[:, :12]) and torch.equal(trimmed_mask, full_mask[:, :12])
    assert cache.encode_batch(prompts, pad_multiple=64)[0].shape[1] == 32  # never past max_length


def test_padded_length_by_hand() -> None:
    assert padded_length(1, 256, 64) == 64
    assert padded_length(64, 256, 64) == 64
    assert padded_length(65, 256, 64) == 128
    assert padded_length(250, 256, 64) == 256  # 256 is the cap, also a multiple
    assert padded_length(200, 224, 64) == 224  # rounded to 256, capped at max_length
    assert padded_length(3, 256, 0) == 256  # 0: no trimming
    with pytest.raises(ValueError, match="pad multiple"):
        padded_length(3, 256, -1)


def test_cache_is_bounded_in_bytes_and_drops_the_least_recently_used(minilm: Any) -> None:
    encoder = minilm(16)
    one_token_bytes = 384 * 4 + 1  # fp32 states of one token plus its mask byte
    # "cat" and "dog" are 3 tokens each: room for two such entries, not three.
    cache = CachedTextEncoder(encoder, max_bytes=7 * one_token_bytes)
    cache.encode(["cat", "dog"])
    assert cache.cached_bytes == 6 * one_token_bytes
    cache.encode(["cat"])  # "cat" is now the most recently used
    cache.encode(["sun"])  # evicts "dog"
    assert cache.cached_bytes <= cache.max_bytes
    forwards = cache.forwards
    cache.encode(["cat"])
    assert cache.forwards == forwards  # still cached
    cache.encode(["dog"])
    assert cache.forwards == forwards + 1  # was evicted, encoded again


def test_a_cache_of_zero_bytes_still_batches(minilm: Any) -> None:
    cache = CachedTextEncoder(minilm(16), max_bytes=0)
    cache.encode(["cat", "dog"])
    cache.encode(["cat", "dog"])
    assert cache.forwards == 2 and cache.cached_bytes == 0


def test_lengths_come_from_the_tokenizer_without_reading_the_device(minilm: Any) -> None:
    encoder = minilm(16)
    _, mask_BL, lengths = encoder.encode_with_lengths(["cat", "a red circle at the top left"])
    assert lengths == mask_BL.sum(1).tolist() == [3, 9]
