"""Loss term ``repa``: representation alignment to a frozen vision encoder (reference.md §4, REPA).

REPA (Yu et al. 2024, arXiv 2410.06940) projects the image tokens after denoiser block ``layer``
with a small trainable MLP and pulls them towards the patch tokens of a frozen self-supervised
ViT (DINOv2 / DINOv3) computed on the clean image. The term is −mean cosine similarity, weighted
by λ, so the total loss gains −λ·cos.

Importing this module is torch-free (``prx-run plugins`` and recipe checks import it). The teacher
is loaded in :func:`prx_configure` through :mod:`prx_core.vision`, kept in ``run.plugin_state``, never
returned from ``prx_build_modules`` and never saved in checkpoints (reference.md §7.9): a resumed run
reloads it from its weights. The projector is a trainable module (``run.trainable.extras["repa"]``),
so it is optimised, checkpointed and EMA-averaged with the model. By default its weights are stored
in the precision policy's compute dtype (bf16 under ``bf16_mixed``), as the reference keeps its
projector in bf16 (reference.md §8); ``projector_dtype = "param"`` stores them like every other weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from prx_core import hookimpl
from prx_core.config import RecipeError
from prx_core.hookspecs import LossTerm, PluginInfo

if TYPE_CHECKING:
    import torch

    from prx_core.context import RunContext, StepContext
    from prx_core.vision import FrozenEncoder

__all__ = [
    "INFO",
    "prx_check_recipe",
    "RepaConfig",
    "loaded_teacher",
    "prx_build_modules",
    "prx_configure",
    "prx_loss_terms",
    "prx_precompute_features",
]


@dataclass(frozen=True)
class RepaConfig:
    """The ``[plugins.repa]`` table."""

    #: λ: the total loss gains −λ·mean cos-sim (reference.md §4: 0.5).
    weight: float = 0.5
    #: 0-based index of the block whose output tokens are aligned (reference.md §4: 7, i.e. block 8 of 16).
    layer: int = 7
    #: A short name from ``prx_core.vision.TEACHERS`` (``dinov2_vitl14_reg``, ``dinov3_vitl16``,
    #: ``dinov2_vitb14_reg``) or any timm ViT id.
    encoder: str = "dinov2_vitl14_reg"
    #: Local ``.safetensors``/``.pth`` state dict of the encoder. Empty: timm's hub download.
    weights: str = ""
    #: Width of the projector's two hidden layers (reference.md §4: 1024). Its output width is always the
    #: encoder's embedding width (1024 for the ViT-L teachers).
    projector_dim: int = 1024
    #: Where the projector's weights are stored. ``compute``: the policy's compute dtype
    #: (``precision.frozen_dtype``: bf16 under ``bf16_mixed``, fp32 under ``fp32``), as the
    #: reference stores its projector in bf16 under bf16 autocast (reference.md §8); declared to
    #: the precision guard and logged. ``param``: ``precision.param_dtype``, like every other weight.
    projector_dtype: Literal["compute", "param"] = "compute"
    #: Extra ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads``…). Only for
    #: tests and toy-scale ablations that use a tiny teacher of the same family from a local
    #: ``weights`` file; leave empty with real pretrained weights.
    encoder_overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (a 0-based block index), got {self.layer}")
        if self.projector_dim < 1:
            raise ValueError(f"projector_dim must be >= 1, got {self.projector_dim}")
        if not self.encoder.strip():
            raise ValueError("encoder must name a teacher (e.g. 'dinov2_vitl14_reg' or 'dinov3_vitl16')")
        if self.projector_dtype not in ("compute", "param"):
            raise ValueError(f"projector_dtype must be 'compute' or 'param', got {self.projector_dtype!r}")


INFO = PluginInfo(
    name="repa",
    summary="Loss term: align block `layer` tokens (MLP projector) to frozen DINOv2/DINOv3 patch tokens (REPA)",
    spec="reference.md §4 (REPA)",
    paper="https://arxiv.org/abs/2410.06940",
    config=RepaConfig,
)


def loaded_teacher(run: RunContext) -> FrozenEncoder:
    """The run's frozen teacher, loaded on first use (in ``prx_configure``, so a bad path fails at setup)."""
    from prx_core.vision import frozen_encoder_for_run

    return frozen_encoder_for_run(run, INFO.name, run.plugin_config(INFO.name))


def precomputed_width(run: RunContext) -> int | None:
    """The teacher's embedding width when the data source stores this encoder's tokens, else None."""
    from prx_core.vision import precomputed_teacher_width

    config: RepaConfig = run.plugin_config(INFO.name)
    return precomputed_teacher_width(run, INFO.name, config.encoder)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses an aligned block past the model's last one, as setup would."""
    from prx_core.recipe_checks import block_index_problem

    config: RepaConfig | None = recipe.plugins.get(INFO.name)
    if config is None:
        return []
    problem = block_index_problem(f"plugins.{INFO.name}.layer", config.layer, recipe.model.depth)
    return [problem] if problem else []


@hookimpl
def prx_configure(run: RunContext) -> None:
    config: RepaConfig = run.plugin_config(INFO.name)
    from prx_core.recipe_checks import block_index_problem

    # prx_check_recipe refuses this already; repeated for runs built from an unchecked recipe.
    problem = block_index_problem(f"plugins.{INFO.name}.layer", config.layer, run.recipe.model.depth)
    if problem:
        raise RecipeError(problem)
    run.capture_after_block(config.layer)
    if precomputed_width(run) is None:
        loaded_teacher(run)


@hookimpl
def prx_build_modules(run: RunContext) -> dict[str, torch.nn.Module]:
    from prx_repa.alignment import build_projector

    config: RepaConfig = run.plugin_config(INFO.name)
    width = precomputed_width(run) or loaded_teacher(run).embed_dim
    # Plain init: core seeds the global generator from (recipe seed, plugin name) around this hook.
    projector = build_projector(run.recipe.model.hidden_size, config.projector_dim, width)
    if config.projector_dtype == "compute":
        run.store_weights_in(
            projector,
            run.require("precision").frozen_dtype,
            owner=INFO.name,
            reason="projector_dtype = 'compute': the reference keeps the REPA projector in bf16",
        )
    return {INFO.name: projector}


@hookimpl
def prx_precompute_features(run: RunContext, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's patch tokens on the denoiser's token grid, as the loss would compute them."""
    import torch

    from prx_core.vision import image_token_grid
    from prx_repa.alignment import TEACHER_RESIZE, feature_key

    config: RepaConfig = run.plugin_config(INFO.name)
    grid_hw = image_token_grid(run, images_BCHW, "repa")
    with torch.no_grad():
        tokens_BNE = loaded_teacher(run).patch_tokens(images_BCHW, grid_hw, resize=TEACHER_RESIZE)
    return {feature_key(config.encoder, grid_hw): tokens_BNE}


@hookimpl
def prx_loss_terms(step: StepContext) -> list[LossTerm]:
    from prx_core.keys import ROUTE_PLAN, captured_block
    from prx_core.vision import token_grid
    from prx_repa.alignment import feature_key, repa_loss

    run = step.run
    config: RepaConfig = run.plugin_config(INFO.name)
    stored = step.precomputed.get(feature_key(config.encoder, token_grid(step.x0_BCHW, run.recipe.model.patch_size)))
    value = repa_loss(
        run.require("trainable").extras[INFO.name],
        captured_block(step.stash, config.layer, INFO.name),
        # Without stored tokens the teacher runs (loaded now if setup did not need it).
        loaded_teacher(run) if stored is None and step.images_BCHW is not None else None,
        step.images_BCHW,
        step.x0_BCHW,
        run.recipe.model.patch_size,
        plan=step.stash.get(ROUTE_PLAN),
        layer=config.layer,
        precomputed_BNE=stored,
    )
    return [LossTerm(INFO.name, config.weight, value)]
