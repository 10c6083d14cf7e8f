"""The text padding mask reaches SDPA as a broadcastable boolean mask, never as a materialised
``B × heads × L × L`` float bias (reference.md §7.10), in a real training step and in the denoiser."""

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


@pytest.fixture
def sdpa_masks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every ``attn_mask`` SDPA receives (diffusers' native backend calls it by attribute)."""
    seen: list[Any] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attn_mask", args[0] if args else None)
        seen.append(None if mask is None else (mask.dtype, tuple(mask.shape), tuple(query.shape), mask.clone()))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    yield seen


def _assert_boolean_broadcast(seen: list[Any]) -> None:
    assert seen, "SDPA was never called"
    for entry in seen:
        assert entry is not None, "a padded batch must reach attention with its mask"
        dtype, shape, query_shape, _ = entry
        assert dtype == torch.bool, f"attention got a {dtype} mask (an additive bias), not a boolean one"
        batch, heads, queries, _ = query_shape
        # [B, 1, 1, L_keys]: one row per sample, broadcast over heads and queries by SDPA itself.
        assert shape[0] == batch and shape[1] == 1 and shape[2] == 1, f"mask of shape {shape} for {query_shape}"
        assert heads > 1 and queries > 1  # so the broadcast dims really are dims that were not materialised


def test_training_step_hands_sdpa_a_boolean_broadcast_mask(tmp_path: Path, sdpa_masks: list[Any]) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path), tmp_path / "run")
    # Keep only the denoiser's calls (the MiniLM text encoder uses SDPA too, unmasked by design).
    spans: list[tuple[int, int]] = []
    pre = trainer.forward_module.register_forward_pre_hook(lambda m, a: spans.append((len(sdpa_masks), -1)))
    post = trainer.forward_module.register_forward_hook(lambda m, a, o: spans.append((spans.pop()[0], len(sdpa_masks))))
    try:
        trainer.train_step(0)
    finally:
        pre.remove()
        post.remove()
    ((start, end),) = spans
    del sdpa_masks[end:], sdpa_masks[:start]
    assert len(sdpa_masks) == trainer.recipe.model.depth  # one attention per block
    _assert_boolean_broadcast(sdpa_masks)
    text_len = trainer.run.require("text_encoder").max_length
    for _, shape, query_shape, mask in sdpa_masks:
        assert shape[-1] == text_len + query_shape[2]  # text keys, then image keys
        assert mask[..., text_len:].all()  # image keys are never masked
    assert not sdpa_masks[0][3][..., :text_len].all()  # the captions are padded: some text keys are masked


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x_BCHW = torch.randn(3, 3, 8, 8, generator=gen)
    t_B = torch.rand(3, generator=gen)
    text_BLD = torch.randn(3, 6, 12, generator=gen)
    mask_BL = torch.ones(3, 6, dtype=torch.bool)
    mask_BL[0, 4:] = False
    mask_BL[2, 1:] = False
    return x_BCHW, t_B, text_BLD, mask_BL


def _model() -> torch.nn.Module:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PRX zero-initialises modulation and the final layer
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _ctx() -> ForwardContext:
    return ForwardContext(stash=Stash(), generator=None, training=False)


def test_denoiser_output_equals_model_forward_with_the_boolean_mask(sdpa_masks: list[Any]) -> None:
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        ours = denoise(model, x, t, text, mask, _ctx())
        reference = model(x, t, text, attention_mask=mask).sample
    assert torch.equal(ours, reference)
    _assert_boolean_broadcast(sdpa_masks)


def test_the_mask_is_applied_padded_text_changes_nothing() -> None:
    """Independent of how the mask is built: garbage in padded text positions must not matter."""
    model = _model()
    x, t, text, mask = _inputs()
    noisy = text.clone()
    noisy[~mask] = 1e3 * torch.randn(int((~mask).sum()), text.shape[-1])
    with torch.no_grad():
        clean = denoise(model, x, t, text, mask, _ctx())
        garbage = denoise(model, x, t, noisy, mask, _ctx())
        unmasked = denoise(model, x, t, noisy, None, _ctx())
    assert torch.allclose(clean, garbage, atol=1e-5)
    assert not torch.allclose(clean, unmasked, atol=1e-2)  # negative control: without the mask it matters


def test_a_non_boolean_mask_is_converted_once_to_bool(sdpa_masks: list[Any]) -> None:
    model = _model()
    x, t, text, mask = _inputs()
    with torch.no_grad():
        from_bool = denoise(model, x, t, text, mask, _ctx())
        from_float = denoise(model, x, t, text, mask.float(), _ctx())
    assert torch.equal(from_bool, from_float)
    _assert_boolean_broadcast(sdpa_masks)
