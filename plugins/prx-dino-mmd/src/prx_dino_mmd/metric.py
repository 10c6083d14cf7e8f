"""The ``dino_mmd`` metric object: CLS features of a frozen DINOv2 and the shared RBF MMD."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prx_core.metrics_math import MMD_SCALE, MMD_SIGMA, mmd_rbf
from prx_core.vision import FrozenEncoder


class DinoMmdMetric:
    """``dino_mmd``: MMD (σ = 10, biased, × 1000) between L2-normalised DINOv2 CLS features."""

    name = "dino_mmd"
    needs_reference = True

    def __init__(self, encoder: FrozenEncoder, resolution: int) -> None:
        if not encoder.has_cls_token:
            raise ValueError(f"dino_mmd: encoder '{encoder.timm_id}' has no CLS token")
        if resolution % encoder.patch_size:
            raise ValueError(
                f"dino_mmd: resolution {resolution} is not a multiple of the encoder's patch size "
                f"{encoder.patch_size} ({encoder.timm_id}); the published DINO-MMD uses 518 = 37 × 14"
            )
        self.encoder = encoder
        self.resolution = resolution

    @torch.no_grad()
    def features(self, images_BCHW: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Unit-norm CLS features [B, E] on the CPU, for float images in [0, 1]."""
        if not isinstance(images_BCHW, torch.Tensor) or not images_BCHW.is_floating_point():
            kind = images_BCHW.dtype if isinstance(images_BCHW, torch.Tensor) else type(images_BCHW).__name__
            raise ValueError(f"dino_mmd: expected float images in [0, 1], got {kind}")
        cls_BE = self.encoder.cls_token(images_BCHW.clamp(0.0, 1.0), self.resolution)
        return F.normalize(cls_BE.float(), dim=-1).cpu()

    def score(self, generated_ND: torch.Tensor, reference_ND: torch.Tensor | None) -> dict[str, float]:
        if reference_ND is None:
            raise ValueError("dino_mmd needs reference features (real held-out images); got None")
        return {"dino_mmd": float(mmd_rbf(generated_ND, reference_ND, sigma=MMD_SIGMA, scale=MMD_SCALE))}
