"""Metric ``shapes_adherence``: do generated images show what their synthetic-shapes caption says?

For the offline ``synthetic_shapes`` data source only (it is declared as a requirement, so
``prx-run check`` rejects other recipes). Each evaluation prompt is a held-out long caption that
pins down every shape's colour, kind, size and grid cell and the background; the metric reads the
generated image back at those cells and reports how often colour, background and shape kind are
right. That makes caption fidelity (long vs short captions, caption dropout, guidance strength)
measurable at toy scale without a learned judge. No reference images are needed.

Importing this module is torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_shapes_adherence.metric import ShapesAdherenceMetric

__all__ = ["INFO", "ShapesAdherenceConfig", "prx_register_metrics"]


@dataclass(frozen=True)
class ShapesAdherenceConfig:
    """The ``[metrics.shapes_adherence]`` table: no settings (the captions define the task)."""


INFO = PluginInfo(
    name="shapes_adherence",
    summary="Metric: colour, background and shape kind of generated synthetic shapes vs their long captions",
    spec="reference.md §4 (caption length)",
    requires=("data:synthetic_shapes",),
)


def _build(config: ShapesAdherenceConfig, run: Any) -> ShapesAdherenceMetric:
    from prx_shapes_adherence.metric import ShapesAdherenceMetric

    return ShapesAdherenceMetric()


@hookimpl
def prx_register_metrics(registry: Any) -> None:
    registry.register("shapes_adherence", _build, ShapesAdherenceConfig)
