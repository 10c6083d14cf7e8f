"""The denoiser: ``diffusers.PRXTransformer2DModel``, run block by block by the trainer.

The trainer does not call ``model.forward``: it replays it from the model's own submodules so
that token routers and feature capture can act at block boundaries without patching the model.
``tests/unit/test_denoiser.py`` keeps :func:`denoise` bit-identical to ``model.forward`` when
nothing is routed, so trained weights still load in ``PRXPipeline``.

The text padding mask reaches attention as a boolean ``[B, L_txt]`` mask; diffusers' PRX
attention processor appends the (all-True) image keys and hands SDPA a broadcastable
``[B, 1, 1, L_txt + L_img]`` boolean mask, never a materialised ``B × heads × L × L`` float bias
(reference.md §7.10; ``tests/unit/test_attention_mask.py`` intercepts SDPA to keep it so).

Which SDPA kernel runs on CUDA: flash attention takes no ``attn_mask`` at all, so a masked call
goes to the memory-efficient kernel (or cuDNN). The trainer therefore passes ``mask_BL = None``
when no row of the batch is padded, and cuts the text to the batch's longest caption rounded up
to ``[text_encoder] pad_multiple`` (64 by default) so that little padding is left to mask; the
result equals the untrimmed one up to rounding. ``tests/unit/test_text_trim.py`` asks the
installed torch for the flash rule with fake CUDA tensors, and checks both equalities. Under
``train.compile = "blocks"`` each text length (at most ``max_length / pad_multiple`` of them) and
the unmasked call are further graphs; dynamo makes the length dynamic after its first change.

:func:`compile_blocks` is ``train.compile = "blocks"``: regional compilation of each transformer
block in place, so parameter names, checkpoints and exports do not change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import PRXTransformer2DModel
from diffusers.models.transformers.transformer_prx import get_image_ids, img2seq, seq2img
from torch.utils.checkpoint import checkpoint

from prx_core.context import ForwardContext
from prx_core.keys import CAPTURED_FEATURES
from prx_core.recipe import ModelConfig
from prx_core.slots import ConditioningSeam, TokenRouter


class TrainableModules(torch.nn.Module):
    """Everything the optimizer trains: the denoiser plus plugin modules, saved together."""

    def __init__(self, model: PRXTransformer2DModel, extras: Mapping[str, torch.nn.Module] | None = None) -> None:
        super().__init__()
        self.model = model
        # Sorted so parameter order (and so optimizer state layout) never depends on plugin order.
        self.extras = torch.nn.ModuleDict(dict(sorted((extras or {}).items())))


def build_model(config: ModelConfig, context_in_dim: int, dtype: torch.dtype) -> PRXTransformer2DModel:
    model = PRXTransformer2DModel(
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        context_in_dim=context_in_dim,
        hidden_size=config.hidden_size,
        mlp_ratio=config.mlp_ratio,
        num_heads=config.num_heads,
        depth=config.depth,
        axes_dim=list(config.axes_dim),
        theta=config.theta,
        time_factor=config.time_factor,
        time_max_period=config.time_max_period,
        bottleneck_size=config.bottleneck_size,
        resolution_embeds=config.resolution_embeds,
    )
    # The model is built in fp32; cast only when the policy asks for another weight dtype
    # (diffusers warns on every dtype cast, even a no-op one).
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def denoise(
    model: PRXTransformer2DModel,
    x_t_BCHW: torch.Tensor,
    t_B: torch.Tensor,
    text_BLD: torch.Tensor,
    mask_BL: torch.Tensor | None,
    ctx: ForwardContext,
    router: TokenRouter | None = None,
    captures: frozenset[int] | set[int] = frozenset(),
    conditioning: Sequence[ConditioningSeam] = (),
    activation_checkpointing: bool = False,
) -> torch.Tensor:
    """``model.forward`` replayed from submodules, with seams at block boundaries.

    * ``router.enter`` runs before block ``router.start`` and may shrink the image sequence (with
      matching RoPE rows); ``router.exit`` runs after block ``router.end`` and restores it.
    * Blocks listed in ``captures`` publish their output tokens in ``ctx.stash[CAPTURED_FEATURES]``.
    * ``conditioning`` seams may change text tokens, mask and time vector before the blocks.
    """
    weight_dtype = model.txt_in.weight.dtype
    if weight_dtype != x_t_BCHW.dtype and not torch.is_autocast_enabled(x_t_BCHW.device.type):
        # x_t and the text states arrive in fp32 whatever the weights' dtype; without autocast,
        # bf16-stored weights (``bf16_weights`` with autocast off) need their inputs in bf16.
        x_t_BCHW, text_BLD = x_t_BCHW.to(weight_dtype), text_BLD.to(weight_dtype)
    txt_BTH = model.txt_in(text_BLD)
    img_BLH = model.img_in(img2seq(x_t_BCHW, model.patch_size))
    batch, _, height, width = x_t_BCHW.shape
    image_ids = get_image_ids(batch, height, width, patch_size=model.patch_size, device=x_t_BCHW.device)
    rope_full = model.pe_embedder(image_ids)
    vec_BH = model._compute_timestep_embedding(t_B, dtype=img_BLH.dtype)
    if model.resolution_embedder is not None:
        h_B = torch.full((batch,), height, device=x_t_BCHW.device, dtype=torch.float32)
        w_B = torch.full((batch,), width, device=x_t_BCHW.device, dtype=torch.float32)
        vec_BH = vec_BH + model.resolution_embedder(h_B, w_B, dtype=vec_BH.dtype)

    for seam in conditioning:
        txt_BTH, mask_BL, vec_BH = seam.condition(txt_BTH, mask_BL, vec_BH, x_t_BCHW, ctx)
    if mask_BL is not None and mask_BL.dtype != torch.bool:
        # Once per forward rather than once per block; attention only ever sees a boolean mask.
        mask_BL = mask_BL.bool()

    rope = rope_full
    routed = False
    captured: dict[int, torch.Tensor] = {}
    for index, block in enumerate(model.blocks):
        if router is not None and index == router.start:
            entered = router.enter(img_BLH, rope_full, ctx)
            if entered is not None:
                img_BLH, rope = entered
                routed = True
        if activation_checkpointing and torch.is_grad_enabled():
            img_BLH = checkpoint(block, img_BLH, txt_BTH, vec_BH, rope, mask_BL, use_reentrant=False)
        else:
            img_BLH = block(
                hidden_states=img_BLH,
                encoder_hidden_states=txt_BTH,
                temb=vec_BH,
                image_rotary_emb=rope,
                attention_mask=mask_BL,
            )
        if index in captures:
            captured[index] = img_BLH
        if routed and router is not None and index == router.end:
            img_BLH = router.exit(img_BLH, ctx)
            rope = rope_full
            routed = False
    if captured:
        ctx.stash[CAPTURED_FEATURES] = captured
    out_BLP = model.final_layer(img_BLH, vec_BH)
    return seq2img(out_BLP, model.patch_size, x_t_BCHW.shape)


#: Compiler backend for :func:`compile_blocks`. Not a recipe key: tests set ``aot_eager`` here to
#: check the traced graphs without waiting for inductor's C++/Triton code generation.
COMPILE_BACKEND_ENV = "PRX_COMPILE_BACKEND"


def compile_blocks(model: PRXTransformer2DModel, backend: str | None = None) -> None:
    """Compile every transformer block in place (``train.compile = "blocks"``).

    ``nn.Module.compile`` swaps only the block's call implementation, so the block loop, the
    parameter names (state dicts, checkpoints, the exported folder) and any hooks stay as they
    are. Call it after the parallel wrapper: FSDP2 shards each block first, and dynamo then runs
    FSDP2's unshard/reshard hooks eagerly around the compiled forward
    (``torch._dynamo.config.skip_fsdp_hooks``). All blocks share one code object and, with
    dynamo's default inlining of built-in modules, one compiled graph, so compile time is one
    block's, not depth × that. Token routers that shrink the sequence add one recompilation.
    """
    chosen = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    for block in model.blocks:
        block.compile(backend=chosen)


def export_diffusers(model: PRXTransformer2DModel, directory: Path) -> Path:
    """Write a folder that ``PRXTransformer2DModel.from_pretrained`` (and PRXPipeline) loads."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
