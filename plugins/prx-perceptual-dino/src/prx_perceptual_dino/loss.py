"""Perceptual DINO maths: 1 − cosine between frozen DINO patch tokens of x̂0 and of x0."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from prx_core.towers import DATA_DTYPE
from prx_core.vision import mean_cosine_similarity

if TYPE_CHECKING:
    from prx_core.vision import FrozenEncoder


def resize_latents(latents_BCHW: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize to ``resolution``², without antialiasing (the reference's resize, reference.md §8).

    Computed in at least fp32 (:data:`~prx_core.towers.DATA_DTYPE`) whatever dtype x̂0 comes in
    (bf16 under autocast); the cast is differentiable. Latents already at that size are returned
    as they are (bilinear at scale 1 is the identity).
    """
    work_BCHW = latents_BCHW.to(torch.promote_types(latents_BCHW.dtype, DATA_DTYPE))
    if tuple(work_BCHW.shape[-2:]) == (resolution, resolution):
        return work_BCHW
    return F.interpolate(work_BCHW, size=(resolution, resolution), mode="bilinear", align_corners=False)


def perceptual_dino_loss(
    encoder: FrozenEncoder,
    decode: Callable[[torch.Tensor], torch.Tensor],
    prediction_latents_BCHW: torch.Tensor,
    target_latents_BCHW: torch.Tensor,
    resolution: int,
) -> torch.Tensor:
    """Mean over samples of the per-sample mean over patch tokens of (1 − cos), a scalar.

    Both latent batches (pixel latents in [−1, 1]) are first resized to ``resolution``² (a 16×16
    grid for a /14 encoder at 224 px), *then* mapped to images in [0, 1] by ``decode``, which
    clamps: the reference's order, so an x̂0 pixel above 1 whose resized neighbourhood is back in
    range still gets a gradient (clamping first would cut it). The prediction keeps its graph, so
    the gradient flows through the frozen encoder into x̂0; the target side runs without gradient.
    """
    if resolution % encoder.patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the encoder's patch size {encoder.patch_size}")
    side = resolution // encoder.patch_size
    with torch.no_grad():
        target_BNE = encoder.patch_tokens(decode(resize_latents(target_latents_BCHW, resolution)), (side, side))
    prediction_BNE = encoder.patch_tokens(decode(resize_latents(prediction_latents_BCHW, resolution)), (side, side))
    # Every sample has the same number of tokens, so 1 − (mean of per-sample mean cos) is exactly
    # the mean over samples of the per-sample mean of (1 − cos). The cosine is computed in fp32.
    return 1.0 - mean_cosine_similarity(prediction_BNE, target_BNE)
