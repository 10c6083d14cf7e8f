"""Metric ``fid``: Fréchet Inception Distance of generated vs held-out real images (reference.md §6).

Inception-v3 2048-d pool features (the network torchmetrics' FID uses, arXiv 1706.08500), Gaussian
fits of both sets, and their Fréchet distance in float64 (:mod:`prx_core.metrics_math`). Images
reach the network as uint8 in [0, 255] converted once from our [0, 1] floats, never scaled twice
(the reference's wrap-around bug, reference.md §7.2).

Importing this module is torch-free; the network loads in the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_fid.inception import FidMetric

__all__ = ["INFO", "FidConfig", "prx_register_metrics"]


@dataclass(frozen=True)
class FidConfig:
    """The ``[metrics.fid]`` table."""

    #: Local FID Inception weights (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``,
    #: or the same tensors as ``.safetensors``). Empty: the standard download (cached by torch.hub).
    inception_weights: str = ""
    #: Resize to 299 px with antialiased bilinear interpolation (torchmetrics' default). False: the
    #: TensorFlow-1 compatible resize of the original FID code (torch-fidelity / clean TF numbers).
    antialias: bool = True


INFO = PluginInfo(
    name="fid",
    summary="Metric: Fréchet Inception Distance (Inception-v3 pool features, torchmetrics' network)",
    spec="reference.md §6, §7.2",
    paper="https://arxiv.org/abs/1706.08500",
)


def _build(config: FidConfig, run: Any) -> FidMetric:
    """Load the frozen network on the run's device in the precision policy's frozen dtype."""
    from prx_fid.inception import FidMetric, load_inception

    precision = getattr(run, "precision", None)
    if precision is None:
        raise RuntimeError("fid: the precision policy must be built before the metrics")
    network = load_inception(config.inception_weights, run.device, precision.frozen_dtype, config.antialias)
    return FidMetric(network, run.device)


@hookimpl
def prx_register_metrics(registry: Any) -> None:
    registry.register("fid", _build, FidConfig)
