"""Peak GPU memory of a recipe, estimated without a GPU: activations counted on fake CUDA tensors.

A 1.2B denoiser at batch 32 does not fit every resolution on an 80 GB card, and finding out on
the cluster costs a job. This module answers on a laptop:

* **activations**: the real block loop (:func:`prx_core.denoiser.denoise`) runs once on *fake*
  CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no storage),
  under the CUDA autocast the precision policy asks for, while
  ``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd keeps for the
  backward pass. Storages are counted once (views share them) and parameters not at all. SDPA
  is dispatched as the CUDA kernels would be (the memory-efficient kernel when a mask is passed,
  flash otherwise), since on fake tensors PyTorch would otherwise pick the math path and count
  an ``L × L`` attention matrix no GPU run keeps.
* **states**: weights, gradients, optimizer state, DDP gradient buckets, an EMA copy, the frozen
  towers and the text cache, from parameter counts and the recipe.

With activation checkpointing each block keeps only its input, and the backward pass recomputes
one block at a time, so the activations are the inputs of every block plus one block's full set.

The estimate is an upper bound in two ways: text is counted at ``max_length`` (batches are
trimmed to their longest caption) and token routing (TREAD, SPRINT) is ignored. It leaves out
the allocator's fragmentation and the CUDA context (about 0.5–1 GiB), hence a margin
(:data:`HEADROOM_GIB`), and the activations of frozen networks a loss backpropagates through
(LPIPS, Perceptual-DINO), which the summary names. ``prx-run check --memory`` prints it for
every CUDA recipe and fails a recipe that does not fit; ``bench/memory_estimate.py`` prints the
breakdown.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from prx_core.recipe import ModelConfig, Recipe

GIB = 2**30
#: What an estimate may use of a card: the CUDA context, cuBLAS workspaces and fragmentation take the rest.
HEADROOM_GIB = 4.0
#: The card the shipped GPU recipes are sized for (H100/A100 80 GB).
DEFAULT_GPU_GIB = 80.0
#: Processes the shipped GPU recipes are launched on (``torchrun --nproc_per_node 8``).
DEFAULT_WORLD_SIZE = 8

#: Optimizer state per parameter, in parameter-sized tensors. AdamW keeps two moments; Muon keeps
#: one momentum for matrices but runs AdamW (two) on the rest, so two is its upper bound.
OPTIMIZER_STATES = {"adamw": 2, "muon": 2, "sgd": 1}

#: Approximate parameter counts of the frozen networks shipped recipes load on the GPU, by
#: ``slot:use``, ``metric:name`` or ``plugin:name``. They are loaded in the policy's frozen dtype
#: (bf16 under the mixed policies). Counted from the published architectures.
FROZEN_PARAMETERS: dict[str, int] = {
    # T5Gemma-2B encoder (google/t5gemma-2b-2b-ul2): 26 layers of width 2304, MLP 9216, 256k vocab.
    "text_encoder:t5gemma": 2_610_000_000,
    # Qwen3-VL-2B language model used as a text encoder.
    "text_encoder:qwen3vl": 1_720_000_000,
    # all-MiniLM-L6-v2.
    "text_encoder:minilm": 22_700_000,
    # FLUX.1 VAE (encoder + decoder) and the FLUX.2 autoencoder.
    "latent_space:flux_vae": 83_800_000,
    "latent_space:flux2_ae": 84_000_000,
    "latent_space:repa_e_vae": 83_800_000,
    "latent_space:pixel": 0,
    # Evaluation networks: Inception-v3, CLIP ViT-L/14-336 vision tower, DINOv2-L/14.
    "metric:fid": 23_800_000,
    "metric:cmmd": 304_000_000,
    "metric:dino_mmd": 304_000_000,
    # Teachers of representation-alignment / perceptual losses (DINOv2-B/L class encoders, VGG).
    "plugin:repa": 304_000_000,
    "plugin:irepa": 304_000_000,
    "plugin:perceptual_dino": 86_600_000,
    "plugin:lpips": 14_700_000,
}


@dataclass(frozen=True)
class ActivationCount:
    """Bytes autograd keeps for the backward pass of one forward at a given batch and size."""

    #: Saved by each transformer block (its own activations, counted once per storage).
    per_block: tuple[int, ...]
    #: The input each block receives (all a checkpointed block keeps).
    block_input: int
    #: Saved outside the blocks: embedders, final layer, the shared text states and RoPE tables.
    outside: int

    def total(self, checkpointing: bool) -> int:
        if not checkpointing:
            return self.outside + sum(self.per_block)
        # Every block keeps its input; the backward pass rebuilds one block's full set at a time.
        return self.outside + self.block_input * len(self.per_block) + max(self.per_block, default=0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training process, in bytes per component."""

    per_gpu_batch: int
    accumulation: int
    world_size: int
    parameters: int
    checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    ddp_buckets: int
    ema: int
    frozen: int
    text_cache: int
    activations: int
    block_saved: int
    not_counted: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.ddp_buckets
            + self.ema
            + self.frozen
            + self.text_cache
            + self.activations
        )

    def fits(self, gpu_gib: float = DEFAULT_GPU_GIB, headroom_gib: float = HEADROOM_GIB) -> bool:
        return self.total <= (gpu_gib - headroom_gib) * GIB

    def rows(self) -> list[tuple[str, float]]:
        """(component, GiB) in a fixed order, the total last."""
        names = ("weights", "gradients", "optimizer", "ddp_buckets", "ema", "frozen", "text_cache", "activations")
        return [(n, getattr(self, n) / GIB) for n in names] + [("total", self.total / GIB)]

    def summary(self) -> str:
        ckpt = "on" if self.checkpointing else "off"
        return (
            f"{self.total / GIB:.1f} GiB per GPU (batch {self.per_gpu_batch} × {self.accumulation} accumulation, "
            f"activation checkpointing {ckpt}: activations {self.activations / GIB:.1f} GiB, "
            f"{self.block_saved / GIB:.2f} GiB per block)"
            + (f"; not counted: {', '.join(self.not_counted)}" if self.not_counted else "")
        )


# ---------------------------------------------------------------------------------------------- activations


def _cuda_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA as CUDA dispatches it for PRX shapes: memory-efficient with a mask, flash without.

    Both kernels save q, k, v, the output and a log-sum-exp row per query, never the ``L × L``
    probabilities the math kernel (what fake CPU dispatch picks) would keep.
    """
    import torch

    if attn_mask is None:
        out_BLHD = torch.ops.aten._scaled_dot_product_flash_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p, is_causal, scale=scale
        )[0]
        return out_BLHD.transpose(1, 2)
    bias = attn_mask
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(~bias, float("-inf"))
    bias = bias.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, dropout_p, is_causal, scale=scale
    )[0]


@contextmanager
def _cuda_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA autocast on a machine without CUDA (``torch.autocast`` refuses and disables itself)."""
    import torch

    if dtype is None:
        yield
        return
    was_enabled, was_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def _patched_sdpa() -> Iterator[None]:
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _cuda_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count_activations(
    model: ModelConfig,
    context_dim: int,
    batch: int,
    image_side: int,
    text_tokens: int,
    param_dtype: torch.dtype,
    autocast_dtype: torch.dtype | None,
) -> ActivationCount:
    """Bytes saved for backward by one training forward of the denoiser, on fake CUDA tensors.

    ``image_side`` is the side of ``x_t`` (latent or pixel grid), ``text_tokens`` the padded text
    length. Nothing is allocated: the model and the batch are fake.
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from prx_core.context import ForwardContext
    from prx_core.denoiser import build_model, denoise
    from prx_core.keys import Stash

    saved: dict[int, tuple[int, int]] = {}  # storage id -> (bytes, block index or -1)
    weight_storages: set[int] = set()
    current = [-1]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # Weights (and their transposed views, which linear layers save) are counted as weights.
        if storage._cdata not in weight_storages:
            saved.setdefault(storage._cdata, (storage.nbytes(), current[0]))
        return tensor

    block_input = [0]

    def enter(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            current[0] = index
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(hidden, torch.Tensor):
                block_input[0] = hidden.numel() * hidden.element_size()

        return hook

    def leave(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        current[0] = -1

    with FakeTensorMode(), torch.device("cuda"), _patched_sdpa(), _default_dtype(param_dtype):
        # Built directly in the weight dtype: a fake module cannot be cast afterwards.
        denoiser = build_model(model, context_dim, torch.float32)
        weight_storages.update(p.untyped_storage()._cdata for p in denoiser.parameters())
        for index, block in enumerate(denoiser.blocks):
            block.register_forward_pre_hook(enter(index), with_kwargs=True)
            block.register_forward_hook(leave)
        x_t_BCHW = torch.randn(batch, model.in_channels, image_side, image_side)
        t_B = torch.rand(batch)
        text_BLD = torch.randn(batch, text_tokens, context_dim)
        mask_BL = torch.ones(batch, text_tokens, dtype=torch.bool)
        ctx = ForwardContext(stash=Stash(), generator=None, training=True, extras=torch.nn.ModuleDict())
        with _cuda_autocast(autocast_dtype), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            prediction_BCHW = denoise(denoiser, x_t_BCHW, t_B, text_BLD, mask_BL, ctx)
            # The loss: a squared error against an fp32 target, as the objectives compute it.
            loss = (prediction_BCHW.float() - x_t_BCHW).square().mean()
        del loss
    per_block = [0] * model.depth
    outside = 0
    for nbytes, index in saved.values():
        if index < 0:
            outside += nbytes
        else:
            per_block[index] += nbytes
    return ActivationCount(per_block=tuple(per_block), block_input=block_input[0], outside=outside)


# ---------------------------------------------------------------------------------------------- the recipe

#: Plugins whose loss backpropagates through a frozen network (its activations are not estimated).
_LOSS_NETWORK_PLUGINS = frozenset({"lpips", "perceptual_dino"})

#: (parameter bytes, autocast dtype name) of the built-in precision policies.
_POLICIES: dict[str, tuple[int, str | None]] = {
    "bf16_mixed": (4, "bfloat16"),
    "fp32": (4, None),
    "bf16_weights": (2, "bfloat16"),
}


def _parameter_count(model: ModelConfig, context_dim: int) -> int:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from prx_core.denoiser import build_model

    with FakeTensorMode(), torch.device("cuda"):
        return sum(p.numel() for p in build_model(model, context_dim, torch.float32).parameters())


@functools.lru_cache(maxsize=64)
def _cached_activations(
    model: ModelConfig, context_dim: int, batch: int, side: int, tokens: int, param_bytes: int, autocast: str | None
) -> ActivationCount:
    import torch

    param_dtype = torch.float32 if param_bytes == 4 else torch.bfloat16
    autocast_dtype = getattr(torch, autocast) if autocast else None
    return count_activations(model, context_dim, batch, side, tokens, param_dtype, autocast_dtype)


def per_gpu_batch(recipe: Recipe, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) of ``recipe`` on ``world_size`` processes."""
    train = recipe.train
    micro = train.micro_batch if train.micro_batch is not None else max(1, train.global_batch // world_size)
    return micro, max(1, train.global_batch // (micro * world_size))


def estimate_recipe(recipe: Recipe, world_size: int = DEFAULT_WORLD_SIZE) -> MemoryEstimate:
    """The peak memory of one process of ``recipe`` trained on ``world_size`` GPUs."""
    train = recipe.train
    micro, accumulation = per_gpu_batch(recipe, world_size)
    text_config = recipe.slot_config("text_encoder")
    context_dim = int(text_config.dim)
    text_tokens = int(getattr(text_config, "max_length", None) or 256)
    latent_config = recipe.slot_config("latent_space")
    compression = int(getattr(latent_config, "spatial_compression", 1) or 1)
    size = int(getattr(recipe.slot_config("data"), "size", None) or 256)
    precision = recipe.slots["precision"].use
    param_bytes, autocast = _POLICIES.get(precision, (4, "bfloat16"))

    activations = _cached_activations(
        recipe.model, context_dim, micro, size // compression, text_tokens, param_bytes, autocast
    )
    n_params = _parameter_count(recipe.model, context_dim)
    weights = n_params * param_bytes
    optimizer_use = recipe.slots["optimizer"].use
    optimizer = OPTIMIZER_STATES.get(optimizer_use, 2) * n_params * 4  # moments are fp32 under every policy
    sharded = train.parallel == "fsdp2" and world_size > 1
    if sharded:  # FSDP2: each rank holds 1/world of the weights, gradients and state
        weights, optimizer = weights // world_size, optimizer // world_size
    gradients = weights
    # DDP's buckets are views of the gradients (gradient_as_bucket_view), so they cost nothing extra.
    ddp_buckets = 0

    not_counted: list[str] = []
    frozen_bytes = 2 if autocast else 4
    frozen = 0
    keys = [f"{slot}:{recipe.slots[slot].use}" for slot in ("text_encoder", "latent_space")]
    keys += [f"metric:{name}" for name in recipe.metrics]
    keys += [f"plugin:{name}" for name in recipe.plugins]
    for key in keys:
        if key in FROZEN_PARAMETERS:
            frozen += FROZEN_PARAMETERS[key] * frozen_bytes
        elif not key.startswith("plugin:"):  # most plugins hold no network
            not_counted.append(key)
    # Losses that backpropagate through a frozen network keep its activations too (not counted).
    not_counted += [f"{name} activations" for name in recipe.plugins if name in _LOSS_NETWORK_PLUGINS]
    ema = weights if "ema" in recipe.plugins else 0
    from prx_core.text_cache import DEFAULT_CACHE_BYTES

    return MemoryEstimate(
        per_gpu_batch=micro,
        accumulation=accumulation,
        world_size=world_size,
        parameters=n_params,
        checkpointing=train.activation_checkpointing,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        ddp_buckets=ddp_buckets,
        ema=ema,
        frozen=frozen,
        text_cache=DEFAULT_CACHE_BYTES,
        activations=activations.total(train.activation_checkpointing),
        block_saved=max(activations.per_block, default=0),
        not_counted=tuple(not_counted),
    )


def with_checkpointing(recipe: Recipe, enabled: bool) -> Recipe:
    """``recipe`` with ``train.activation_checkpointing`` set (for side-by-side estimates)."""
    return replace(recipe, train=replace(recipe.train, activation_checkpointing=enabled))
