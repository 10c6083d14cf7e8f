"""Loss term ``lpips``: LPIPS-VGG between the x-prediction x̂0 and x0 in pixel space (reference.md §4).

LPIPS (Zhang et al. 2018, arXiv 1801.03924) compares deep VGG16 features of two images with
linear weights calibrated on human perceptual judgements. Here it is a differentiable loss on the
objective's x̂0: gradients flow through the frozen network into x̂0 and from there into the
denoiser. It only makes sense where x̂0 is an image, so the plugin requires the x-prediction
objective and the pixel latent space, and ``prx-run check`` rejects any other recipe before a
model is built (reference.md §7.3).

Importing this module is torch-free; the network loads in :func:`prx_configure`. The network is a
frozen teacher: it is kept in ``run.plugin_state``, never returned from ``prx_build_modules`` and
never saved in checkpoints (reference.md §7.9); a resumed run reloads it from its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prx_core import hookimpl
from prx_core.config import RecipeError
from prx_core.hookspecs import LossTerm, PluginInfo

if TYPE_CHECKING:
    import torch

    from prx_core.context import RunContext, StepContext
    from prx_lpips.network import LPIPSVGG

__all__ = ["INFO", "LPIPSConfig", "prx_configure", "prx_loss_terms"]


@dataclass(frozen=True)
class LPIPSConfig:
    """The ``[plugins.lpips]`` table."""

    #: Weight of the term in the total loss (reference.md §4: 0.1).
    weight: float = 0.1
    #: Scale factor applied to both images before the VGG (bilinear, no antialiasing, as the
    #: reference: reference.md §8); 0.5 turns 1024 px into 512 px, each output pixel the mean of a
    #: 2×2 block. 1.0 leaves them unchanged. The result, floor(side × resize), must be >= 16 px.
    resize: float = 0.5
    #: Only samples with t < t_max (t = 1 is pure noise) contribute; None: every sample.
    t_max: float | None = None
    #: Local torchvision-format VGG16 state dict (.safetensors or .pth). Empty: torchvision's
    #: VGG16_Weights.IMAGENET1K_V1, downloaded once into torch.hub's cache.
    vgg_weights: str = ""
    #: Local file with the five linear layers (lin<k>.model.1.weight). Empty: the v0.1 VGG
    #: calibration bundled in the 'lpips' PyPI package.
    lin_weights: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")
        if not 0 < self.resize <= 1:
            raise ValueError(f"resize must be in (0, 1] (a downscale factor), got {self.resize}")
        if self.t_max is not None and not 0 < self.t_max <= 1:
            raise ValueError(f"t_max must be in (0, 1] or unset, got {self.t_max}")


INFO = PluginInfo(
    name="lpips",
    summary="Loss term: LPIPS-VGG perceptual distance between x̂0 and x0 in pixel space (x-prediction)",
    spec="reference.md §4 (LPIPS)",
    paper="https://arxiv.org/abs/1801.03924",
    requires=("objective:x_prediction", "latent_space:pixel"),
    config=LPIPSConfig,
)


@dataclass
class _State:
    net: LPIPSVGG
    head_dtype: torch.dtype


def _min_side_check(run: RunContext, config: LPIPSConfig) -> None:
    """Fail at setup, not at the first step, when the resized images are too small for VGG16."""
    from prx_lpips.network import MIN_SIDE, resized_side

    size = getattr(run.recipe.slot_config("data"), "size", None)
    if isinstance(size, int) and resized_side(size, config.resize) < MIN_SIDE:
        raise RecipeError(
            f"plugins.lpips: data.size {size} × resize {config.resize} = {resized_side(size, config.resize)} px, but "
            f"LPIPS-VGG needs at least {MIN_SIDE} px per side (four max-pools before relu5_3); raise "
            "plugins.lpips.resize or the image size"
        )


def _state(run: RunContext) -> _State:
    """The run's network, loaded on first use (in ``prx_configure``, so a bad path fails at setup)."""

    def load() -> _State:
        import torch

        from prx_core.towers import DATA_DTYPE
        from prx_lpips.weights import load_lpips_vgg

        config: LPIPSConfig = run.plugin_config(INFO.name)
        precision = run.require("precision")
        net = load_lpips_vgg(config.vgg_weights, config.lin_weights, device=run.device, dtype=precision.frozen_dtype)
        # The head subtracts nearly equal unit vectors, so it runs in the step's data dtype (fp32)
        # or the trunk's if wider: never in param_dtype, so that bf16_weights changes weight
        # storage only, not the loss maths.
        return _State(net=net, head_dtype=torch.promote_types(precision.frozen_dtype, DATA_DTYPE))

    return run.plugin_state(INFO.name, load)


@hookimpl
def prx_configure(run: RunContext) -> None:
    _min_side_check(run, run.plugin_config(INFO.name))
    _state(run)


@hookimpl
def prx_loss_terms(step: StepContext) -> list[LossTerm] | None:
    from prx_core.keys import X0_PREDICTION
    from prx_lpips.network import lpips_loss

    config: LPIPSConfig = step.run.plugin_config(INFO.name)
    state = _state(step.run)
    value = lpips_loss(
        state.net,
        step.stash[X0_PREDICTION],
        step.x0_BCHW,
        step.t_B,
        resize=config.resize,
        t_max=config.t_max,
        head_dtype=state.head_dtype,
    )
    return [LossTerm(INFO.name, config.weight, value)]


def loaded_network(run: RunContext) -> LPIPSVGG:
    """The run's loaded network (for tests and debugging)."""
    return _state(run).net
