"""Loss term ``perceptual_dino``: DINOv2 feature distance between x̂0 and x0 (reference.md §4, Perceptual DINO).

The objective's clean-image estimate x̂0 and the clean image x0 both go through a frozen
DINOv2-B/14 (arXiv 2304.07193) with registers (arXiv 2309.16588) at 224 px; the term is 1 − cosine similarity of
their patch tokens, averaged over tokens and samples. Gradients flow through the frozen encoder
into x̂0 and from there into the denoiser, like LPIPS but with self-supervised ViT features.

x̂0 is an image only with the x-prediction objective in pixel space, so the plugin requires both
and ``prx-run check`` rejects any other recipe before a model is built (reference.md §7.3; the reference
crashed at start-up instead).

Importing this module is torch-free. The encoder is loaded in :func:`prx_configure` through
:mod:`prx_core.vision`, kept in ``run.plugin_state``, never returned from ``prx_build_modules``
and never saved in checkpoints (reference.md §7.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prx_core import hookimpl
from prx_core.config import RecipeError
from prx_core.hookspecs import LossTerm, PluginInfo

if TYPE_CHECKING:
    from prx_core.context import RunContext, StepContext
    from prx_core.vision import FrozenEncoder

__all__ = ["INFO", "PerceptualDinoConfig", "loaded_encoder", "prx_configure", "prx_loss_terms"]


@dataclass(frozen=True)
class PerceptualDinoConfig:
    """The ``[plugins.perceptual_dino]`` table."""

    #: Weight of the term in the total loss (reference.md §4: 0.01).
    weight: float = 0.01
    #: A short name from ``prx_core.vision.TEACHERS`` or any timm ViT id (reference.md §4: DINOv2-B/14-reg).
    encoder: str = "dinov2_vitb14_reg"
    #: Local ``.safetensors``/``.pth`` state dict of the encoder. Empty: timm's hub download.
    weights: str = ""
    #: Side in pixels both images are resized to before the encoder; a multiple of its patch size
    #: (reference.md §4: 224, a 16×16 token grid for /14 patches).
    resolution: int = 224
    #: Extra ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads``…). Only for
    #: tests and toy-scale ablations with a tiny encoder from a local ``weights`` file.
    encoder_overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if not self.encoder.strip():
            raise ValueError("encoder must name a vision encoder (e.g. 'dinov2_vitb14_reg')")


INFO = PluginInfo(
    name="perceptual_dino",
    summary="Loss term: 1 − cos of frozen DINOv2-B/14-reg patch tokens between x̂0 and x0 (x-prediction, pixels)",
    spec="reference.md §4 (Perceptual DINO)",
    paper="https://arxiv.org/abs/2304.07193",
    requires=("objective:x_prediction", "latent_space:pixel"),
    config=PerceptualDinoConfig,
)


def loaded_encoder(run: RunContext) -> FrozenEncoder:
    """The run's frozen encoder, loaded on first use (in ``prx_configure``, so a bad path fails at setup)."""
    from prx_core.vision import frozen_encoder_for_run

    return frozen_encoder_for_run(run, INFO.name, run.plugin_config(INFO.name))


@hookimpl
def prx_configure(run: RunContext) -> None:
    config: PerceptualDinoConfig = run.plugin_config(INFO.name)
    encoder = loaded_encoder(run)
    if config.resolution % encoder.patch_size:
        raise RecipeError(
            f"plugins.perceptual_dino.resolution is {config.resolution}, not a multiple of the encoder's patch "
            f"size {encoder.patch_size} ({encoder.timm_id})"
        )


@hookimpl
def prx_loss_terms(step: StepContext) -> list[LossTerm]:
    from prx_core.keys import X0_PREDICTION
    from prx_perceptual_dino.loss import perceptual_dino_loss

    run = step.run
    config: PerceptualDinoConfig = run.plugin_config(INFO.name)
    latent = run.require("latent_space")
    # The pixel latent space's decode, ((x + 1) / 2).clamp(0, 1), works pixel by pixel, so it may
    # run after the resize: resize, then clamp, the reference's order (reference.md §8).
    value = perceptual_dino_loss(
        loaded_encoder(run),
        latent.decode,
        step.stash[X0_PREDICTION],
        step.x0_BCHW,
        config.resolution,
    )
    return [LossTerm(INFO.name, config.weight, value)]
