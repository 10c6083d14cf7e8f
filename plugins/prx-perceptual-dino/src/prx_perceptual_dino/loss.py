"""Perceptual DINO maths: 1 − cosine between frozen DINO patch tokens of x̂0 and of x0."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prx_core.vision import mean_cosine_similarity

if TYPE_CHECKING:
    from prx_core.vision import FrozenEncoder


def perceptual_dino_loss(
    encoder: FrozenEncoder,
    prediction_images_BCHW: torch.Tensor,
    target_images_BCHW: torch.Tensor,
    resolution: int,
) -> torch.Tensor:
    """Mean over samples of the per-sample mean over patch tokens of (1 − cos), a scalar.

    Both image batches are in [0, 1] and are resized to ``resolution``² (a 16×16 grid for a /14
    encoder at 224 px). The prediction keeps its graph, so the gradient flows through the frozen
    encoder into x̂0; the target side runs without gradient.
    """
    if resolution % encoder.patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the encoder's patch size {encoder.patch_size}")
    side = resolution // encoder.patch_size
    with torch.no_grad():
        target_BNE = encoder.patch_tokens(target_images_BCHW, (side, side))
    prediction_BNE = encoder.patch_tokens(prediction_images_BCHW, (side, side))
    # Every sample has the same number of tokens, so 1 − (mean of per-sample mean cos) is exactly
    # the mean over samples of the per-sample mean of (1 − cos).
    return 1.0 - mean_cosine_similarity(prediction_BNE, target_BNE)
