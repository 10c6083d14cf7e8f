"""iREPA maths: spatially normalised targets, the conv / attention projectors, and the loss."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from prx_core.vision import (
    alignment_targets,
    mean_cosine_similarity,
    route_covers,
    teacher_feature_key,
    token_grid,
    visible_targets,
)

if TYPE_CHECKING:
    from prx_core.keys import RoutePlan
    from prx_core.vision import FrozenEncoder, ResizeMode

#: How the teacher's input is resized to the denoiser's token grid: nearest neighbour by scale
#: factor, exactly as the reference's iREPA (and REPA) does (reference.md §8).
TEACHER_RESIZE: ResizeMode = "nearest"

#: Keeps the division finite for a channel that is constant over the image.
SPATIAL_NORM_EPS = 1e-6


class RoutingUnsupportedError(RuntimeError):
    """The conv projector needs the full token grid, which a token router removes."""


def spatial_normalise(targets_BNE: torch.Tensor, eps: float = SPATIAL_NORM_EPS) -> torch.Tensor:
    """Per sample and channel: subtract the mean over tokens, divide by the std over tokens.

    This removes the component every patch shares (the global, image-level part of the teacher's
    features) and keeps the spatial contrast between patches, which iREPA finds is what helps
    generation. The std is the population one; any constant factor is irrelevant to a cosine.
    """
    mean_B1E = targets_BNE.mean(dim=1, keepdim=True)
    std_B1E = targets_BNE.std(dim=1, keepdim=True, correction=0)
    return (targets_BNE - mean_B1E) / (std_B1E + eps)


class ConvProjector(torch.nn.Module):
    """3×3 conv → SiLU → 1×1 conv on the token grid: neighbouring tokens inform each projection."""

    def __init__(self, hidden_size: int, projector_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(hidden_size, projector_dim, kernel_size=3, padding=1)
        self.act = torch.nn.SiLU()
        self.conv_out = torch.nn.Conv2d(projector_dim, embed_dim, kernel_size=1)

    def forward(self, tokens_BKH: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        batch, count, hidden = tokens_BKH.shape
        grid_h, grid_w = grid_hw
        if count != grid_h * grid_w:
            raise RoutingUnsupportedError(
                f"irepa: the conv projector needs the full {grid_h}×{grid_w} token grid but got {count} tokens "
                '(a token router routes this block); use projector = "attention" with token routing'
            )
        # Tokens are row-major over the grid (diffusers' img2seq), so a reshape restores the image layout.
        x_BHhw = tokens_BKH.transpose(1, 2).reshape(batch, hidden, grid_h, grid_w)
        out_BEhw = self.conv_out(self.act(self.conv_in(x_BHhw)))
        return out_BEhw.flatten(2).transpose(1, 2)


class AttentionProjector(torch.nn.Module):
    """Linear H → d, one pre-norm self-attention block over the tokens, linear d → E.

    Works on any subset of tokens (so with token routing), since it never needs the grid.
    """

    def __init__(self, hidden_size: int, projector_dim: int, heads: int, embed_dim: int) -> None:
        super().__init__()
        self.proj_in = torch.nn.Linear(hidden_size, projector_dim)
        self.norm = torch.nn.LayerNorm(projector_dim)
        self.attn = torch.nn.MultiheadAttention(projector_dim, heads, batch_first=True)
        self.proj_out = torch.nn.Linear(projector_dim, embed_dim)

    def forward(self, tokens_BKH: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        x_BKD = self.proj_in(tokens_BKH)
        normed_BKD = self.norm(x_BKD)
        attended_BKD, _ = self.attn(normed_BKD, normed_BKD, normed_BKD, need_weights=False)
        return self.proj_out(x_BKD + attended_BKD)


def build_projector(
    kind: str, hidden_size: int, projector_dim: int, heads: int, embed_dim: int
) -> ConvProjector | AttentionProjector:
    """The chosen projector, with default PyTorch init from the global generator (core seeds it from
    (recipe seed, plugin name) around ``prx_build_modules``, so the weights do not depend on plugin order)."""
    if kind == "conv":
        return ConvProjector(hidden_size, projector_dim, embed_dim)
    if kind == "attention":
        return AttentionProjector(hidden_size, projector_dim, heads, embed_dim)
    raise ValueError(f"irepa: unknown projector {kind!r}; expected 'conv' or 'attention'")


def irepa_targets(
    teacher: FrozenEncoder,
    images_BCHW: torch.Tensor,
    grid_hw: tuple[int, int],
    plan: RoutePlan | None,
    layer: int,
) -> torch.Tensor:
    """Spatially normalised teacher patch tokens on the denoiser's grid, [B, K, E], without gradient.

    The statistics are taken over the whole image (all grid tokens) before a route plan keeps the
    visible ones, so routing does not change what a given target token is.
    """
    with torch.no_grad():
        targets_BNE = spatial_normalise(teacher.patch_tokens(images_BCHW, grid_hw, resize=TEACHER_RESIZE))
        return visible_targets(targets_BNE, plan, layer)


def feature_key(encoder: str, grid_hw: tuple[int, int]) -> str:
    """The key of precomputed teacher targets (``prx_precompute_features``) for one token grid."""
    return teacher_feature_key("irepa", encoder, grid_hw)


def irepa_loss(
    projector: torch.nn.Module,
    tokens_BKH: torch.Tensor,
    teacher: FrozenEncoder | None,
    images_BCHW: torch.Tensor | None,
    x0_BCHW: torch.Tensor,
    patch_size: int,
    *,
    plan: RoutePlan | None,
    layer: int,
    precomputed_BNE: torch.Tensor | None = None,
) -> torch.Tensor:
    """−mean cosine similarity between projected block tokens and the normalised teacher tokens.

    ``precomputed_BNE``: the spatially normalised teacher tokens of these images over the full
    grid, stored by ``prx-run precompute``; the teacher then does not run.
    """
    if isinstance(projector, ConvProjector) and route_covers(plan, layer):
        raise RoutingUnsupportedError(
            f"irepa: block {layer} is inside the token router's span, and the conv projector needs the full "
            'token grid; use projector = "attention" or align a block outside the routed span'
        )
    grid_hw = token_grid(x0_BCHW, patch_size)
    online = None
    if teacher is not None and images_BCHW is not None:
        online = partial(irepa_targets, teacher, images_BCHW, grid_hw, plan, layer)
    targets_BKE = alignment_targets("irepa", precomputed_BNE, online, grid_hw, plan, layer)
    if targets_BKE.shape[:2] != tokens_BKH.shape[:2]:
        raise RuntimeError(
            f"irepa: block {layer} has tokens of shape {tuple(tokens_BKH.shape)} but the teacher gives targets "
            f"of shape {tuple(targets_BKE.shape)}; the token grid or the route plan does not match"
        )
    # Fed in the projector's storage dtype (``projector_dtype``): a no-op under autocast, and what
    # lets a projector stored in another dtype than the blocks take their tokens without it.
    weight_dtype = next(projector.parameters()).dtype
    return -mean_cosine_similarity(projector(tokens_BKH.to(weight_dtype), grid_hw), targets_BKE)
