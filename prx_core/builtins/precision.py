"""Precision policies ``bf16_mixed`` (the default), ``fp32`` and ``bf16_weights`` (reference.md §4, "Precision policy").

The reference "bf16 weights" ablation silently trained in fp32 (reference.md §7.1), and the opposite
accident, weights quietly ending up in bf16, degrades results. So dtypes are decided in one
place, and a guard checks them at start and after every resume. ``bf16_weights`` is the
deliberate version of that degradation: an ablation that carries a loud ``warning`` (logged at
WARNING level and recorded in the tracker's hparams by the trainer).
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
    """Everything in fp32, no autocast."""

    #: On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores (fp32 range, 10-bit
    #: mantissa products, fp32 accumulation). False: strict IEEE fp32, several times slower.
    tf32: bool = True


@dataclass(frozen=True)
class Bf16WeightsConfig:
    #: Keep bf16 autocast on top of the bf16 weights, so the ops autocast runs in fp32
    #: (softmax, normalisations, losses) stay in fp32 as under ``bf16_mixed``; then the only
    #: difference from ``bf16_mixed`` is where the weights live, which is the ablation.
    autocast: bool = True


INFO = PluginInfo(
    name="precision",
    summary=(
        "Precision policies bf16_mixed (autocast bf16, fp32 weights/grads/optimizer), fp32, and the "
        "bf16_weights ablation (bf16-stored weights, fp32 optimizer state; logged loudly)"
    ),
    spec="reference.md §4 (precision policy), §5, §7.1",
)


def _build_bf16_mixed(config: Bf16MixedConfig, run: Any) -> Any:
    from prx_core.precision import Bf16Mixed

    return Bf16Mixed(run.device, autocast_cpu=config.autocast_cpu)


def _build_fp32(config: Fp32Config, run: Any) -> Any:
    from prx_core.precision import Fp32

    return Fp32(run.device, tf32=config.tf32)


def _build_bf16_weights(config: Bf16WeightsConfig, run: Any) -> Any:
    from prx_core.precision import Bf16Weights

    return Bf16Weights(run.device, autocast=config.autocast)


@hookimpl
def prx_register_precision_policies(registry: Any) -> None:
    registry.register("bf16_mixed", _build_bf16_mixed, Bf16MixedConfig)
    registry.register("fp32", _build_fp32, Fp32Config)
    registry.register("bf16_weights", _build_bf16_weights, Bf16WeightsConfig)
