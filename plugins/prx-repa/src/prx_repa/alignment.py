"""REPA maths: the MLP projector, the teacher targets and the alignment loss."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch

from prx_core.vision import (
    alignment_targets,
    mean_cosine_similarity,
    teacher_feature_key,
    token_grid,
    visible_targets,
)

if TYPE_CHECKING:
    from prx_core.keys import RoutePlan
    from prx_core.vision import FrozenEncoder, ResizeMode

#: How the teacher's input is resized to the denoiser's token grid: nearest neighbour by scale
#: factor, exactly as the reference does (reference.md §8).
TEACHER_RESIZE: ResizeMode = "nearest"


def build_projector(hidden_size: int, projector_dim: int, embed_dim: int) -> torch.nn.Module:
    """The REPA MLP H → d → d → E with SiLU (reference.md §4: H→1024→1024→1024 for a ViT-L teacher).

    Default PyTorch init from the global generator, which core seeds from (recipe seed, plugin
    name) around ``prx_build_modules``, so the weights do not depend on plugin order.
    """
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, projector_dim),
        torch.nn.SiLU(),
        torch.nn.Linear(projector_dim, projector_dim),
        torch.nn.SiLU(),
        torch.nn.Linear(projector_dim, embed_dim),
    )


def repa_targets(
    teacher: FrozenEncoder,
    images_BCHW: torch.Tensor,
    grid_hw: tuple[int, int],
    plan: RoutePlan | None,
    layer: int,
) -> torch.Tensor:
    """Teacher patch tokens of the clean images on the denoiser's token grid, [B, K, E].

    The images are resized (:data:`TEACHER_RESIZE`) so the teacher's patch grid equals the
    denoiser's (reference.md §4). When a token router routes block ``layer``, only the visible
    tokens are kept, in the router's order. No gradient: the teacher is a fixed target.
    """
    with torch.no_grad():
        targets_BNE = teacher.patch_tokens(images_BCHW, grid_hw, resize=TEACHER_RESIZE)
        return visible_targets(targets_BNE, plan, layer)


def feature_key(encoder: str, grid_hw: tuple[int, int]) -> str:
    """The key of precomputed teacher tokens (``prx_precompute_features``) for one token grid."""
    return teacher_feature_key("repa", encoder, grid_hw)


def repa_loss(
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
    """−mean cosine similarity between projected block tokens and the teacher's patch tokens.

    ``precomputed_BNE``: the teacher's patch tokens of these images, stored by ``prx-run
    precompute`` (what :meth:`FrozenEncoder.patch_tokens` gives here); the teacher then does not run.
    """
    grid_hw = token_grid(x0_BCHW, patch_size)
    online = None
    if teacher is not None and images_BCHW is not None:
        online = partial(repa_targets, teacher, images_BCHW, grid_hw, plan, layer)
    targets_BKE = alignment_targets("repa", precomputed_BNE, online, grid_hw, plan, layer)
    if targets_BKE.shape[:2] != tokens_BKH.shape[:2]:
        raise RuntimeError(
            f"repa: block {layer} has tokens of shape {tuple(tokens_BKH.shape)} but the teacher gives targets "
            f"of shape {tuple(targets_BKE.shape)}; the token grid or the route plan does not match"
        )
    return -mean_cosine_similarity(project(projector, tokens_BKH), targets_BKE)


def project(projector: torch.nn.Module, tokens_BKH: torch.Tensor) -> torch.Tensor:
    """The projected tokens, fed in the projector's storage dtype.

    Under autocast the cast changes nothing (the linear layers run in the autocast dtype anyway);
    without autocast it lets a projector stored in another dtype than the blocks (``projector_dtype``)
    take their tokens.
    """
    weight_dtype = next(projector.parameters()).dtype
    return projector(tokens_BKH.to(weight_dtype))
