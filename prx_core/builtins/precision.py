"""Precision policies ``bf16_mixed`` (the default) and ``fp32`` (SPEC §4, "Precision policy").

The reference "bf16 weights" ablation silently trained in fp32 (SPEC §7.1), and the opposite
accident, weights quietly ending up in bf16, degrades results. So dtypes are decided in one
place, and a guard checks them at start and after every resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class Bf16MixedConfig:
    #: Autocast on CPU too. PyTorch supports bf16 autocast on every CPU, but without native
    #: bf16 units it can be slower than fp32; tiny CPU recipes may prefer ``fp32``.
    autocast_cpu: bool = True


@dataclass(frozen=True)
class Fp32Config:
    """No settings: everything in fp32, no autocast."""


INFO = PluginInfo(
    name="precision",
    summary="Precision policies bf16_mixed (autocast bf16, fp32 weights/grads/optimizer) and fp32",
    spec="SPEC §4 (precision policy), §7.1",
)


def _build_bf16_mixed(config: Bf16MixedConfig, run: Any) -> Any:
    from prx_core.precision import Bf16Mixed

    return Bf16Mixed(run.device, autocast_cpu=config.autocast_cpu)


def _build_fp32(config: Fp32Config, run: Any) -> Any:
    from prx_core.precision import Fp32

    return Fp32()


@hookimpl
def prx_register_precision_policies(registry: Any) -> None:
    registry.register("bf16_mixed", _build_bf16_mixed, Bf16MixedConfig)
    registry.register("fp32", _build_fp32, Fp32Config)
