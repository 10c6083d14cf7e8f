"""Text trimmed to the batch's longest caption computes what the full padding computes; a batch
without padding reaches attention without a mask; and which SDPA kernels torch allows for each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prx_core.context import ForwardContext
from prx_core.denoiser import build_model, denoise
from prx_core.keys import Stash
from prx_core.recipe import ModelConfig
from prx_core.testing.fixtures import make_trainer, tiny_recipe

TINY = ModelConfig(in_channels=3, patch_size=2, hidden_size=64, num_heads=2, axes_dim=(16, 16), depth=2)
CONTEXT_DIM = 24


def _context() -> ForwardContext:
    return ForwardContext(stash=Stash(), generator=None, training=False)


def _padded_text(lengths: list[int], length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token states, zero past each row's length (as every text encoder returns them), and the mask."""
    mask_BL = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    states_BLD = torch.randn(len(lengths), length, CONTEXT_DIM, generator=generator) * mask_BL[..., None]
    return states_BLD, mask_BL


def test_trimmed_padding_gives_the_full_paddings_output() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, CONTEXT_DIM, torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    x_t_BCHW = torch.randn(2, 3, 8, 8, generator=generator)
    t_B = torch.tensor([0.3, 0.8])
    text_BLD, mask_BL = _padded_text([5, 11], 256, generator)
    with torch.no_grad():
        full = denoise(model, x_t_BCHW, t_B, text_BLD, mask_BL, _context())
        # Longest caption 11 tokens, rounded up to 64; and cut to exactly 11.
        for keep in (64, 11):
            trimmed = denoise(model, x_t_BCHW, t_B, text_BLD[:, :keep], mask_BL[:, :keep], _context())
            torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)


def test_no_mask_equals_an_all_true_mask() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, CONTEXT_DIM, torch.float32).eval()
    generator = torch.Generator().manual_seed(2)
    x_t_BCHW = torch.randn(2, 3, 8, 8, generator=generator)
    t_B = torch.tensor([0.5, 0.1])
    text_BLD, mask_BL = _padded_text([16, 16], 16, generator)
    with torch.no_grad():
        masked = denoise(model, x_t_BCHW, t_B, text_BLD, mask_BL, _context())
        unmasked = denoise(model, x_t_BCHW, t_B, text_BLD, None, _context())
    torch.testing.assert_close(unmasked, masked, rtol=1e-6, atol=1e-6)


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, bool]]]:
    """(key length, whether a mask was passed) of every SDPA call."""
    seen: list[tuple[int, bool]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attn_mask", args[0] if args else None)
        seen.append((key.shape[-2], mask is not None))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    yield seen


def _denoiser_calls(trainer: Any, seen: list[tuple[int, bool]]) -> list[tuple[int, bool]]:
    """The SDPA calls of one training step's denoiser forwards (not the text encoder's)."""
    spans: list[int] = []
    pre = trainer.forward_module.register_forward_pre_hook(lambda m, a: spans.append(len(seen)))
    try:
        trainer.train_step(0)
    finally:
        pre.remove()
    # The denoiser's blocks run right after its forward starts, 2 blocks per micro-step.
    return [call for start in spans for call in seen[start : start + TINY_DEPTH]]


TINY_DEPTH = 2  # the tiny recipe's model.depth
IMAGE_TOKENS = (16 // 4) ** 2  # 16-px shapes, patch size 4


def test_training_step_trims_text_to_the_longest_caption_rounded_up(
    tmp_path: Path, sdpa_calls: list[tuple[int, bool]]
) -> None:
    patch = {"text_encoder": {"max_length": 48, "pad_multiple": 8}, "objective": {"caption_dropout": 0.0}}
    trainer = make_trainer(tiny_recipe(tmp_path, patch), tmp_path / "run")
    from prx_core.slots import BatchRequest

    request = BatchRequest(step=0, micro_step=0, accumulation=1, rank=0, world_size=1, size=4, seed=0)
    captions = trainer.run.require("data").batch(request).captions
    tokenizer = trainer.run.require("text_encoder").encoder.tokenizer  # the MiniLM inside the cache
    tokens = [len(ids) for ids in tokenizer(captions)["input_ids"]]
    expected = -(-max(tokens) // 8) * 8  # the longest caption rounded up to a multiple of 8
    assert expected < 48  # so the test shows a cut
    calls = _denoiser_calls(trainer, sdpa_calls)
    assert len(calls) == TINY_DEPTH  # one micro-step
    for key_length, masked in calls:
        assert key_length - IMAGE_TOKENS == expected
        assert masked == (min(tokens) < expected)


def test_training_step_without_padding_gives_attention_no_mask(
    tmp_path: Path, sdpa_calls: list[tuple[int, bool]]
) -> None:
    # 8 tokens: every synthetic caption is longer, so every row is full (and dropout is off).
    patch = {"text_encoder": {"max_length": 8}, "objective": {"caption_dropout": 0.0}}
    trainer = make_trainer(tiny_recipe(tmp_path, patch), tmp_path / "run")
    calls = _denoiser_calls(trainer, sdpa_calls)
    assert calls and all(key_length == 8 + IMAGE_TOKENS and not masked for key_length, masked in calls)


# ---------------------------------------------------------------- which SDPA kernel


def _prx_attention_inputs(device: str, masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PRX-1.2B's joint attention at 256 px: 16 heads of 112, 256 image + 256 text keys, bf16."""
    query_BHLE = torch.empty(2, 16, 256 + 256, 112, device=device, dtype=torch.bfloat16)
    mask_B11L = torch.ones(2, 1, 1, 256 + 256, device=device, dtype=torch.bool) if masked else None
    return query_BHLE, mask_B11L


def _why_not_flash(capfd: pytest.CaptureFixture[str], masked: bool) -> str:
    """torch's own reasons (its debug warnings) why flash attention would refuse these inputs on CUDA."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    capfd.readouterr()
    with FakeTensorMode():  # CUDA tensors without a GPU: only shapes, dtypes and devices exist
        query, mask = _prx_attention_inputs("cuda", masked)
        can_use_flash_attention(SDPAParams(query, query, query, mask, 0.0, False, False), True)
    return capfd.readouterr().err


def test_flash_attention_refuses_a_mask_and_only_a_mask(capfd: pytest.CaptureFixture[str]) -> None:
    """The rule behind dropping the mask for unpadded batches, asked of the installed torch.

    Flash attention takes no ``attn_mask``; the memory-efficient kernel does. Without a GPU the
    hardware check fails first, but torch still reports each failed condition when asked with
    ``debug=True``; the test reads those reasons.
    """
    masked = _why_not_flash(capfd, masked=True)
    if "attn_mask" not in masked:
        pytest.skip("this torch build does not report SDPA's reasons without a GPU")
    assert "attn_mask" not in _why_not_flash(capfd, masked=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_flash_runs_unmasked_prx_attention_and_the_efficient_kernel_masked() -> None:
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    query, _ = _prx_attention_inputs("cuda", masked=False)
    assert can_use_flash_attention(SDPAParams(query, query, query, None, 0.0, False, False), True)
    query, mask = _prx_attention_inputs("cuda", masked=True)
    assert not can_use_flash_attention(SDPAParams(query, query, query, mask, 0.0, False, False), False)
    assert can_use_efficient_attention(SDPAParams(query, query, query, mask, 0.0, False, False), True)
