"""Loss term ``irepa``: REPA that emphasises spatial structure (reference.md §4, iREPA).

iREPA (Singh et al. 2025, arXiv 2512.10794) keeps REPA's recipe (align the tokens after block
``layer`` with a frozen DINOv2/DINOv3's patch tokens of the clean image, −λ·mean cos-sim) and
changes two things, both aimed at transferring *spatial* rather than global information:

* the targets are normalised over space, per sample and channel (the patch-shared component goes);
* the projector is a small conv net on the token grid (default) or a small attention block,
  instead of REPA's per-token MLP.

The conv projector needs the full token grid, so it refuses a token router (TREAD, SPRINT) whose
span covers ``layer``: at setup when the router is configured, and again at loss time if a route
plan covers the layer. The attention projector works on any subset of tokens.

Importing this module is torch-free. The teacher is loaded in :func:`prx_configure` through
:mod:`prx_core.vision`, kept in ``run.plugin_state``, never returned from ``prx_build_modules``
and never saved in checkpoints (reference.md §7.9). The projector is ``run.trainable.extras["irepa"]``;
by default its weights are stored in the precision policy's compute dtype (bf16 under
``bf16_mixed``), as the reference keeps its iREPA projectors in bf16 (reference.md §8).
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
    "IrepaConfig",
    "loaded_teacher",
    "prx_build_modules",
    "prx_configure",
    "prx_loss_terms",
    "prx_precompute_features",
]


@dataclass(frozen=True)
class IrepaConfig:
    """The ``[plugins.irepa]`` table."""

    #: λ: the total loss gains −λ·mean cos-sim (as REPA, reference.md §4: 0.5).
    weight: float = 0.5
    #: 0-based index of the block whose output tokens are aligned (as REPA: 7, block 8 of 16).
    layer: int = 7
    #: A short name from ``prx_core.vision.TEACHERS`` or any timm ViT id.
    encoder: str = "dinov2_vitl14_reg"
    #: Local ``.safetensors``/``.pth`` state dict of the encoder. Empty: timm's hub download.
    weights: str = ""
    #: ``conv``: 3×3 conv → SiLU → 1×1 conv on the token grid (needs every token, so no routing of
    #: ``layer``). ``attention``: linear → one self-attention block → linear (works with routing).
    projector: Literal["conv", "attention"] = "conv"
    #: Width inside the projector (conv channels / attention width).
    projector_dim: int = 1024
    #: Attention heads of the attention projector; must divide ``projector_dim``.
    projector_heads: int = 8
    #: Where the projector's weights are stored. ``compute``: the policy's compute dtype
    #: (``precision.frozen_dtype``: bf16 under ``bf16_mixed``, fp32 under ``fp32``), as the
    #: reference stores its projectors in bf16 under bf16 autocast (reference.md §8); declared to
    #: the precision guard and logged. ``param``: ``precision.param_dtype``, like every other weight.
    projector_dtype: Literal["compute", "param"] = "compute"
    #: Extra ``timm.create_model`` arguments (``embed_dim``, ``depth``, ``num_heads``…). Only for
    #: tests and toy-scale ablations with a tiny teacher from a local ``weights`` file.
    encoder_overrides: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0 (a 0-based block index), got {self.layer}")
        if self.projector_dim < 1 or self.projector_heads < 1:
            raise ValueError(
                f"projector_dim and projector_heads must be >= 1, got {self.projector_dim}, {self.projector_heads}"
            )
        if self.projector == "attention" and self.projector_dim % self.projector_heads:
            raise ValueError(
                f"projector_dim {self.projector_dim} is not divisible by projector_heads {self.projector_heads}"
            )
        if not self.encoder.strip():
            raise ValueError("encoder must name a teacher (e.g. 'dinov2_vitl14_reg' or 'dinov3_vitl16')")
        if self.projector_dtype not in ("compute", "param"):
            raise ValueError(f"projector_dtype must be 'compute' or 'param', got {self.projector_dtype!r}")


INFO = PluginInfo(
    name="irepa",
    summary="Loss term: REPA with spatially normalised targets and a conv/attention projector (iREPA)",
    spec="reference.md §4 (iREPA)",
    paper="https://arxiv.org/abs/2512.10794",
    config=IrepaConfig,
)


def loaded_teacher(run: RunContext) -> FrozenEncoder:
    """The run's frozen teacher, loaded on first use (in ``prx_configure``, so a bad path fails at setup)."""
    from prx_core.vision import frozen_encoder_for_run

    return frozen_encoder_for_run(run, INFO.name, run.plugin_config(INFO.name))


def router_span_problem(router: Any, layer: int, projector: str) -> str | None:
    """Why a conv projector cannot align block ``layer`` under ``router``, or None when it can.

    ``router`` is the run's built token router, the recipe's ``[router]`` config, or any object
    with ``start``/``end``; None when the recipe routes no tokens.
    """
    if projector != "conv" or router is None:
        return None
    start, end = getattr(router, "start", None), getattr(router, "end", None)
    if isinstance(start, int) and isinstance(end, int) and start <= layer <= end:
        return (
            f"'plugins.irepa.layer' is {layer}, inside the token router's span (blocks {start}..{end}), where "
            "blocks see only the visible tokens, but the conv projector needs the full token grid; set "
            'plugins.irepa.projector = "attention" or choose a layer outside the routed span'
        )
    return None


def check_router_span(router: Any, layer: int, projector: str) -> None:
    """Refuse, before training, a conv projector on a block that a token router routes."""
    problem = router_span_problem(router, layer, projector)
    if problem:
        raise RecipeError(problem)


@hookimpl
def prx_check_recipe(recipe: Any) -> list[str]:
    """``prx-run check`` refuses what setup would: an aligned block past the model's last one, and a
    conv projector on a block the recipe's token router routes (any router with ``start``/``end``)."""
    from prx_core.recipe_checks import block_index_problem

    config: IrepaConfig | None = recipe.plugins.get(INFO.name)
    if config is None:
        return []
    router = recipe.slots.get("router")
    problems = [
        block_index_problem(f"plugins.{INFO.name}.layer", config.layer, recipe.model.depth),
        router_span_problem(router.config if router is not None else None, config.layer, config.projector),
    ]
    return [p for p in problems if p]


@hookimpl
def prx_configure(run: RunContext) -> None:
    config: IrepaConfig = run.plugin_config(INFO.name)
    from prx_core.recipe_checks import block_index_problem

    # prx_check_recipe refuses this already; repeated for runs built from an unchecked recipe.
    problem = block_index_problem(f"plugins.{INFO.name}.layer", config.layer, run.recipe.model.depth)
    if problem:
        raise RecipeError(problem)
    check_router_span(run.router, config.layer, config.projector)
    run.capture_after_block(config.layer)
    if precomputed_width(run) is None:
        loaded_teacher(run)


def precomputed_width(run: RunContext) -> int | None:
    """The teacher's embedding width when the data source stores this encoder's targets, else None."""
    from prx_core.vision import precomputed_teacher_width

    config: IrepaConfig = run.plugin_config(INFO.name)
    return precomputed_teacher_width(run, INFO.name, config.encoder)


@hookimpl
def prx_build_modules(run: RunContext) -> dict[str, torch.nn.Module]:
    from prx_irepa.alignment import build_projector

    config: IrepaConfig = run.plugin_config(INFO.name)
    # Plain init: core seeds the global generator from (recipe seed, plugin name) around this hook.
    projector = build_projector(
        config.projector,
        run.recipe.model.hidden_size,
        config.projector_dim,
        config.projector_heads,
        precomputed_width(run) or loaded_teacher(run).embed_dim,
    )
    if config.projector_dtype == "compute":
        run.store_weights_in(
            projector,
            run.require("precision").frozen_dtype,
            owner=INFO.name,
            reason="projector_dtype = 'compute': the reference keeps the iREPA projector in bf16",
        )
    return {INFO.name: projector}


@hookimpl
def prx_precompute_features(run: RunContext, images_BCHW: torch.Tensor) -> dict[str, torch.Tensor]:
    """The spatially normalised teacher tokens over the full token grid (before any route plan)."""
    import torch

    from prx_core.vision import image_token_grid
    from prx_irepa.alignment import TEACHER_RESIZE, feature_key, spatial_normalise

    config: IrepaConfig = run.plugin_config(INFO.name)
    grid_hw = image_token_grid(run, images_BCHW, "irepa")
    with torch.no_grad():
        targets_BNE = spatial_normalise(loaded_teacher(run).patch_tokens(images_BCHW, grid_hw, resize=TEACHER_RESIZE))
    return {feature_key(config.encoder, grid_hw): targets_BNE}


@hookimpl
def prx_loss_terms(step: StepContext) -> list[LossTerm]:
    from prx_core.keys import ROUTE_PLAN, captured_block
    from prx_core.vision import token_grid
    from prx_irepa.alignment import feature_key, irepa_loss

    run = step.run
    config: IrepaConfig = run.plugin_config(INFO.name)
    stored = step.precomputed.get(feature_key(config.encoder, token_grid(step.x0_BCHW, run.recipe.model.patch_size)))
    value = irepa_loss(
        run.require("trainable").extras[INFO.name],
        captured_block(step.stash, config.layer, INFO.name),
        # Without stored targets the teacher runs (loaded now if setup did not need it).
        loaded_teacher(run) if stored is None and step.images_BCHW is not None else None,
        step.images_BCHW,
        step.x0_BCHW,
        run.recipe.model.patch_size,
        plan=step.stash.get(ROUTE_PLAN),
        layer=config.layer,
        precomputed_BNE=stored,
    )
    return [LossTerm(INFO.name, config.weight, value)]
