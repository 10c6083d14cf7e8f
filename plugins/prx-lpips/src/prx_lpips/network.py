"""LPIPS-VGG (Zhang et al. 2018, arXiv 1801.03924, version 0.1) as plain torch.

The network is torchvision's ``vgg16().features`` trunk, cut after relu1_2, relu2_2, relu3_3,
relu4_3 and relu5_3. Each cut's feature map is normalised to unit length over channels, the two
images' maps are subtracted and squared, a non-negative 1×1 linear layer (no bias) sums the
channels, and the result is averaged over space and summed over the five cuts. The layer indices
match torchvision's, so a torchvision VGG16 state dict (``features.<i>.weight``) loads as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prx_core.towers import DATA_DTYPE

#: torchvision's VGG16 configuration "D": conv widths, "M" is a 2×2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: ``features`` indices that end each LPIPS stage (exclusive): relu1_2 is index 3, relu5_3 index 29.
STAGE_ENDS: tuple[int, ...] = (4, 9, 16, 23, 30)
#: Channels of the five stage outputs, i.e. the inputs of the five linear layers.
STAGE_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
#: LPIPS v0.1's input scaling, applied to images in [-1, 1]: (x - shift) / scale. These map [-1, 1]
#: to roughly the ImageNet-normalised range the VGG was trained on.
SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
#: Smallest image side the trunk accepts: four 2×2 max-pools come before relu5_3.
MIN_SIDE = 16
#: LPIPS's epsilon in the channel normalisation.
EPS = 1e-10


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (the final max-pool, index 30, is unused)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_channels = int(item)
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
            # Not in place (torchvision uses inplace=True): the stage outputs are kept for the
            # distance while the next stage runs, so nothing may overwrite them.
            layers.append(nn.ReLU(inplace=False))
            in_channels = out_channels
    return nn.Sequential(*layers)


def normalize_channels(features_BCHW: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Each spatial position's feature vector scaled to unit L2 norm over channels."""
    norm_B1HW = features_BCHW.pow(2).sum(dim=1, keepdim=True).sqrt()
    return features_BCHW / (norm_B1HW + eps)


def stage_distance(feats_a_BCHW: torch.Tensor, feats_b_BCHW: torch.Tensor, lin_C: torch.Tensor) -> torch.Tensor:
    """One stage's LPIPS contribution per sample [B].

    ``lin_C`` is the 1×1 linear layer's weight (one output, no bias); applying it as a weighted
    channel sum is the same maths as the convolution and keeps the head in the features' dtype
    even under autocast.
    """
    diff_BCHW = (normalize_channels(feats_a_BCHW) - normalize_channels(feats_b_BCHW)).pow(2)
    return (diff_BCHW * lin_C[None, :, None, None]).sum(dim=1).mean(dim=(1, 2))


def resized_side(side: int, factor: float) -> int:
    """The side :func:`resize_images` produces: ``floor(side × factor)``, as ``F.interpolate`` does."""
    return math.floor(side * factor)


def resize_images(images_BCHW: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear resize by the scale factor ``factor``, without antialiasing (reference.md §8).

    Exactly the reference's ``F.interpolate(x, scale_factor=factor, mode="bilinear",
    align_corners=False)``: the new side is ``floor(side × factor)`` and output pixel i samples
    input position (i + ½)/factor − ½, so ×0.5 is the mean of each 2×2 block. Computed in at least
    fp32 (:data:`~prx_core.towers.DATA_DTYPE`) whatever dtype x̂0 comes in; the cast is
    differentiable. ``factor == 1`` returns the input unchanged.
    """
    if factor == 1.0:
        return images_BCHW
    work_BCHW = images_BCHW.to(torch.promote_types(images_BCHW.dtype, DATA_DTYPE))
    return F.interpolate(work_BCHW, scale_factor=factor, mode="bilinear", align_corners=False)


class LPIPSVGG(nn.Module):
    """Frozen LPIPS-VGG: ``forward(a, b)`` gives the per-sample distance [B] of images in [-1, 1].

    The trunk runs in the module's dtype (the precision policy's frozen dtype); the distance head
    (normalisation, squared difference, linear layer, means) runs in ``head_dtype``, because it
    subtracts nearly equal unit vectors and bf16's 8-bit mantissa would swamp the difference.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        for k, channels in enumerate(STAGE_CHANNELS):
            self.register_buffer(f"lin{k}", torch.zeros(channels))

    def lin_weights(self) -> list[torch.Tensor]:
        return [self.get_buffer(f"lin{k}") for k in range(len(STAGE_CHANNELS))]

    def stages(self, images_BCHW: torch.Tensor) -> list[torch.Tensor]:
        """The five stage outputs (relu1_2 … relu5_3) of images in [-1, 1]."""
        height, width = images_BCHW.shape[-2:]
        if min(height, width) < MIN_SIDE:
            raise ValueError(
                f"lpips: images of {height}×{width} px reach the VGG16 trunk, but it needs at least "
                f"{MIN_SIDE} px per side (four 2×2 max-pools come before relu5_3); use larger images or a "
                "larger 'resize'"
            )
        h_BCHW = (images_BCHW.to(self.shift.dtype) - self.shift) / self.scale
        outputs: list[torch.Tensor] = []
        start = 0
        for end in STAGE_ENDS:
            for index in range(start, end):
                h_BCHW = self.features[index](h_BCHW)
            outputs.append(h_BCHW)
            start = end
        return outputs

    def forward(
        self, a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, head_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        if a_BCHW.shape != b_BCHW.shape:
            raise ValueError(
                f"lpips: the two image batches differ in shape: {tuple(a_BCHW.shape)} vs {tuple(b_BCHW.shape)}"
            )
        if a_BCHW.ndim != 4 or a_BCHW.shape[1] != 3:
            raise ValueError(f"lpips: expected RGB images [B, 3, H, W] in [-1, 1], got shape {tuple(a_BCHW.shape)}")
        dtype = head_dtype or a_BCHW.dtype
        total_B = a_BCHW.new_zeros(a_BCHW.shape[0], dtype=dtype)
        for fa, fb, lin_C in zip(self.stages(a_BCHW), self.stages(b_BCHW), self.lin_weights(), strict=True):
            total_B = total_B + stage_distance(fa.to(dtype), fb.to(dtype), lin_C.to(dtype))
        return total_B


def lpips_loss(
    net: LPIPSVGG,
    x0_hat_BCHW: torch.Tensor,
    x0_BCHW: torch.Tensor,
    t_B: torch.Tensor,
    *,
    resize: float,
    t_max: float | None,
    head_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Mean per-sample LPIPS between x̂0 and x0 (pixel latents in [-1, 1]), a scalar.

    With ``t_max`` only samples with ``t < t_max`` (t = 1 is noise) contribute, and the mean is
    over those. When none does, the value is 0 but still part of x̂0's graph, so the term can be
    weighted, summed and backpropagated like any other. Selecting the samples costs one host sync;
    in return the VGG never runs on the samples that are dropped.
    """
    if t_max is not None:
        keep_K = torch.nonzero(t_B < t_max).flatten()
        if keep_K.numel() == 0:
            # An empty slice of x̂0 sums to an exact 0 that is still connected to x̂0's graph
            # (unlike x̂0.sum() * 0, which would be NaN for a non-finite x̂0).
            zero = x0_hat_BCHW.flatten()[:0].sum()
            return zero.to(head_dtype) if head_dtype is not None else zero
        keep_K = keep_K.to(x0_hat_BCHW.device)
        x0_hat_BCHW = x0_hat_BCHW.index_select(0, keep_K)
        x0_BCHW = x0_BCHW.index_select(0, keep_K)
    pred_BCHW = resize_images(x0_hat_BCHW, resize)
    target_BCHW = resize_images(x0_BCHW.detach(), resize)
    distance_B: torch.Tensor = net(pred_BCHW, target_BCHW, head_dtype=head_dtype)
    return distance_B.mean()
