"""Metric ``dino_mmd``: RBF MMD of DINOv2 CLS features, generated vs held-out real (reference.md §6).

DINOv2-L/14 with registers (arXiv 2304.07193, 2309.16588) CLS tokens at 518 px, L2-normalised,
compared with the same estimator as CMMD: Gaussian RBF kernel σ = 10, biased (all pairs, diagonal
included), × 1000 (core's :func:`prx_core.metrics_math.mmd_rbf`, float64, chunked). The encoder
loads through core's :func:`prx_core.vision.load_frozen_encoder`, the loader REPA uses, so the
same local weight files work for both.

Importing this module is torch-free; the encoder loads in the factory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_dino_mmd.metric import DinoMmdMetric

__all__ = ["INFO", "DinoMmdConfig", "prx_register_metrics"]


@dataclass(frozen=True)
class DinoMmdConfig:
    """The ``[metrics.dino_mmd]`` table."""

    #: A short name from ``prx_core.vision.TEACHERS`` or a timm ViT id (reference.md §6: DINOv2-L/14-reg).
    encoder: str = "dinov2_vitl14_reg"
    #: Local ``.safetensors``/``.pth`` state dict of the encoder. Empty: timm's hub download.
    weights: str = ""
    #: Side in pixels images are resized to; a multiple of the encoder's patch size (reference.md §6: 518).
    resolution: int = 518
    #: Extra ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads``…), only for
    #: tests and toy runs with a tiny encoder from a local ``weights`` file.
    encoder_overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.encoder.strip():
            raise ValueError("encoder must name a vision encoder (e.g. 'dinov2_vitl14_reg')")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")


INFO = PluginInfo(
    name="dino_mmd",
    summary="Metric: RBF MMD (σ 10, ×1000) of L2-normalised DINOv2-L/14-reg CLS features at 518 px",
    spec="reference.md §6",
    paper="https://arxiv.org/abs/2304.07193",
)


def _build(config: DinoMmdConfig, run: Any) -> DinoMmdMetric:
    """Load the frozen encoder on the run's device in the precision policy's frozen dtype."""
    from prx_core.vision import load_frozen_encoder
    from prx_dino_mmd.metric import DinoMmdMetric

    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError("dino_mmd: the precision policy must be built before the metrics")
    encoder = load_frozen_encoder(
        config.encoder, config.weights, run.device, precision.frozen_dtype, overrides=config.encoder_overrides
    )
    return DinoMmdMetric(encoder, config.resolution)


@hookimpl
def prx_register_metrics(registry: Any) -> None:
    registry.register("dino_mmd", _build, DinoMmdConfig)
