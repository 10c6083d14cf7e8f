"""The trainer's block loop must be bit-identical to diffusers' ``model.forward`` (fp32, CPU)."""

from __future__ import annotations

import torch

from prx_core.context import ForwardContext
from prx_core.denoiser import build_model, denoise
from prx_core.keys import CAPTURED_FEATURES, Stash
from prx_core.recipe import ModelConfig

TINY = ModelConfig(in_channels=3, patch_size=2, hidden_size=64, num_heads=2, axes_dim=(16, 16), depth=3)


def _inputs(batch: int = 3, side: int = 8, text_len: int = 5, text_dim: int = 12):
    gen = torch.Generator().manual_seed(0)
    x_BCHW = torch.randn(batch, 3, side, side, generator=gen)
    t_B = torch.rand(batch, generator=gen)
    text_BLD = torch.randn(batch, text_len, text_dim, generator=gen)
    mask_BL = torch.ones(batch, text_len, dtype=torch.bool)
    mask_BL[0, 3:] = False
    mask_BL[2, 1:] = False
    return x_BCHW, t_B, text_BLD, mask_BL


def _randomise(model: torch.nn.Module) -> None:
    # PRX zero-initialises modulation and the final layer; random weights make the test meaningful.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _ctx() -> ForwardContext:
    return ForwardContext(stash=Stash(), generator=None, training=False)


def test_block_loop_is_bit_identical_to_model_forward() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    _randomise(model)
    x, t, text, mask = _inputs()
    with torch.no_grad():
        expected = model(x, t, text, attention_mask=mask).sample
        ours = denoise(model, x, t, text, mask, _ctx())
    assert expected.abs().sum() > 0
    assert torch.equal(ours, expected)


def test_parity_holds_with_resolution_embeds_and_bottleneck() -> None:
    config = ModelConfig(
        in_channels=3,
        patch_size=4,
        hidden_size=64,
        num_heads=2,
        axes_dim=(16, 16),
        depth=2,
        bottleneck_size=16,
        resolution_embeds=True,
    )
    model = build_model(config, context_in_dim=12, dtype=torch.float32)
    _randomise(model)
    x, t, text, mask = _inputs(side=16)
    with torch.no_grad():
        assert torch.equal(denoise(model, x, t, text, mask, _ctx()), model(x, t, text, attention_mask=mask).sample)


def test_gradients_match_model_forward_and_checkpointing() -> None:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    _randomise(model)
    x, t, text, mask = _inputs()
    grads = []
    for run in ("reference", "loop", "checkpointed"):
        model.zero_grad()
        if run == "reference":
            out = model(x, t, text, attention_mask=mask).sample
        else:
            out = denoise(model, x, t, text, mask, _ctx(), activation_checkpointing=run == "checkpointed")
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0], grads[2])


def test_capture_publishes_block_outputs() -> None:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    _randomise(model)
    x, t, text, mask = _inputs()
    outputs: list[torch.Tensor] = []
    hook = model.blocks[1].register_forward_hook(lambda m, args, out: outputs.append(out))
    ctx = _ctx()
    with torch.no_grad():
        denoise(model, x, t, text, mask, ctx, captures={1})
    hook.remove()
    features = ctx.stash[CAPTURED_FEATURES]
    assert set(features) == {1}
    assert features[1].shape == (3, 16, 64)
    assert torch.equal(features[1], outputs[0])


class _DropHalfRouter:
    """A test router: keeps even tokens visible over blocks 1..1."""

    start = 1
    end = 1

    def __init__(self) -> None:
        self.full: torch.Tensor | None = None

    def enter(self, img_BLH, rope, ctx):
        self.full = img_BLH
        keep = torch.arange(0, img_BLH.shape[1], 2)
        return img_BLH[:, keep], rope[:, :, keep]

    def exit(self, img_BKH, ctx):
        out = self.full.clone()
        out[:, ::2] = img_BKH
        return out


def test_router_seam_runs_routed_blocks_on_visible_tokens_only() -> None:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    _randomise(model)
    x, t, text, mask = _inputs()
    seen: list[int] = []
    hook = model.blocks[1].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    ctx = _ctx()
    with torch.no_grad():
        routed = denoise(model, x, t, text, mask, ctx, router=_DropHalfRouter(), captures={1})
    hook.remove()
    with torch.no_grad():
        plain = denoise(model, x, t, text, mask, _ctx())
    assert seen == [8]  # 16 tokens, half visible
    assert ctx.stash[CAPTURED_FEATURES][1].shape[1] == 8
    assert not torch.equal(routed, plain)


class _AppendMaskedTokens:
    """A conditioning seam that appends two text tokens which the mask hides."""

    def condition(self, txt_BTH, mask_BT, vec_BH, x_t_BCHW, ctx):
        extra = torch.full((txt_BTH.shape[0], 2, txt_BTH.shape[2]), 5.0)
        hidden = torch.zeros(txt_BTH.shape[0], 2, dtype=torch.bool)
        return torch.cat([txt_BTH, extra], 1), torch.cat([mask_BT, hidden], 1), vec_BH


class _ShiftVec:
    def condition(self, txt_BTH, mask_BT, vec_BH, x_t_BCHW, ctx):
        return txt_BTH, mask_BT, vec_BH + ctx.extras["shift"].weight.sum()


def test_conditioning_seams_change_text_and_time_vector() -> None:
    model = build_model(TINY, context_in_dim=12, dtype=torch.float32)
    _randomise(model)
    x, t, text, mask = _inputs()
    with torch.no_grad():
        plain = denoise(model, x, t, text, mask, _ctx())
        masked = denoise(model, x, t, text, mask, _ctx(), conditioning=[_AppendMaskedTokens()])
        shift = torch.nn.Linear(1, 1, bias=False)
        ctx = ForwardContext(stash=Stash(), generator=None, training=False, extras={"shift": shift})
        shifted = denoise(model, x, t, text, mask, ctx, conditioning=[_ShiftVec()])
    # Masked-out tokens change nothing (up to summation order inside attention).
    assert torch.allclose(masked, plain, atol=1e-6)
    assert not torch.allclose(shifted, plain, atol=1e-3)
