"""Tracker ``aim``: metrics with contexts, the resolved recipe, plugin versions, the git SHA and
sample grids, written to an `Aim <https://aimstack.io>`_ repository.

Importing this module must stay cheap (no aim, no torch): ``prx-run plugins`` and recipe checks
import every named plugin. Aim itself is imported by the tracker when the run starts, on rank 0
only (the factory runs on every rank; only rank 0 ever calls ``start``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

if TYPE_CHECKING:
    from prx_aim.tracker import AimTracker

__all__ = ["INFO", "AimConfig", "prx_register_trackers"]

INFO = PluginInfo(
    name="aim",
    summary="Tracker: metrics with train/eval/t-bin contexts, resolved recipe, plugin versions and sample grids in Aim",
    spec="reference.md §6 (tracking)",
)


@dataclass(frozen=True)
class AimConfig:
    """The ``[tracker]`` table when ``use = "aim"``."""

    #: Empty: a repository inside the run directory, ``<run_dir>/aim``. Otherwise the path of a
    #: repository shared by several runs (created if missing; ``~`` expands, relative paths are
    #: relative to the working directory).
    repo: str = ""
    #: Aim experiment the run belongs to. Empty: the recipe's ``name``.
    experiment: str = ""
    #: Seconds between Aim's CPU/GPU/memory usage samples (a background thread); 0 turns them off.
    system_metrics_interval: float = 0.0

    def __post_init__(self) -> None:
        if self.system_metrics_interval < 0:
            raise ValueError(f"system_metrics_interval must be >= 0 seconds, got {self.system_metrics_interval}")


def _build(config: AimConfig, run: Any) -> AimTracker:
    """Every rank builds the tracker; it touches nothing until ``start`` (rank 0 only)."""
    from prx_aim.tracker import AimTracker

    return AimTracker(config, run.run_dir, run.logger)


@hookimpl
def prx_register_trackers(registry: Any) -> None:
    registry.register("aim", _build, AimConfig)
