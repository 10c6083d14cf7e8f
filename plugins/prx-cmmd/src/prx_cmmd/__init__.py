"""Metric ``cmmd``: CLIP-MMD between generated and held-out real images (reference.md §6, arXiv 2401.09603).

CLIP ViT-L/14-336 image embeddings (L2-normalised) of both sets, compared with the squared
maximum mean discrepancy under a Gaussian RBF kernel with σ = 10, biased estimator (all pairs,
diagonal included), × 1000. The MMD is core's :func:`prx_core.metrics_math.mmd_rbf`, computed in
float64 and chunked, shared with ``dino_mmd``.

Importing this module is torch-free; transformers and the model load in the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_cmmd.clip import CmmdMetric

__all__ = ["INFO", "CmmdConfig", "prx_register_metrics"]


@dataclass(frozen=True)
class CmmdConfig:
    """The ``[metrics.cmmd]`` table."""

    #: Hub id or local directory of a ``CLIPVisionModelWithProjection`` (a full CLIP checkpoint
    #: works too: its text tower is skipped). reference.md §6: CLIP ViT-L/14 at 336 px.
    model: str = "openai/clip-vit-large-patch14-336"
    #: Directory inside ``model`` holding it, e.g. a pipeline's ``"image_encoder"``.
    subfolder: str = ""

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("model must be a hub id or a local directory")


INFO = PluginInfo(
    name="cmmd",
    summary="Metric: CMMD, RBF-kernel MMD (σ 10, ×1000) of CLIP ViT-L/14-336 image embeddings",
    spec="reference.md §6",
    paper="https://arxiv.org/abs/2401.09603",
)


def _build(config: CmmdConfig, run: Any) -> CmmdMetric:
    """Load the frozen CLIP tower on the run's device in the precision policy's frozen dtype."""
    from prx_cmmd.clip import CmmdMetric, load_clip

    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError("cmmd: the precision policy must be built before the metrics")
    return CmmdMetric(load_clip(config.model, config.subfolder, run.device, precision.frozen_dtype))


@hookimpl
def prx_register_metrics(registry: Any) -> None:
    registry.register("cmmd", _build, CmmdConfig)
