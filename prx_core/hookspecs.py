"""The contract between the trainer and every plugin, core's own included.

There are two kinds of hooks.

**Registries** fill the exclusive slots. Each ``prx_register_*`` hook is called once per run,
at setup, for every *active* plugin; an implementation calls
``registry.register(name, factory, Config)``. A recipe then picks one entry per slot by name
(``[objective] use = "flow_matching"``), so which implementation runs never depends on plugin
order. ``factory(config, run)`` builds the object; ``Config`` is a frozen dataclass that the rest
of the slot's table binds to strictly. The protocols the built objects follow are in
:mod:`prx_core.slots`.

**Additive hooks** let any number of plugins contribute. Core combines their results in a way
that does not depend on plugin order (sorted by name, summed, or "at most one may answer"), and
the conformance suite checks that by reversing the order.

Only core's builtins and the plugins a recipe names are registered with the plugin manager, so a
plugin that is installed but not named never runs a hook (see :mod:`prx_core.plugins`).
Per-token and per-block work never goes through pluggy: token routers and feature capture are
plain callables that the trainer's block loop calls (see :mod:`prx_core.denoiser`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prx_core import hookspec

if TYPE_CHECKING:
    import torch

    from prx_core.context import RunContext, StepContext
    from prx_core.recipe import Recipe
    from prx_core.registry import PluginRegistrar
    from prx_core.slots import Guidance, Stateful


@dataclass(frozen=True)
class PluginInfo:
    """What a plugin module declares in its module-level ``INFO``.

    ``requires`` and ``conflicts`` are capability strings, checked by ``prx-run check`` before
    any model is built (reference.md §7.3). Capabilities are ``"<slot>:<entry>"`` for the chosen slot
    entries (``"objective:x_prediction"``, ``"latent_space:pixel"``) and ``"plugin:<name>"`` for
    enabled additive plugins. ``config`` is the dataclass that ``[plugins.<name>]`` binds to, for
    plugins that contribute additive hooks; slot entries bind their config through the registry.
    """

    name: str
    summary: str
    spec: str = ""
    paper: str = ""
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    config: type | None = None


@dataclass(frozen=True)
class LossTerm:
    """One named, weighted contribution to the training loss.

    ``value`` is the unweighted scalar; core adds ``weight * value`` to the objective's loss and
    logs both ``loss/<name>`` (unweighted) and the total. Terms are summed in name order.
    """

    name: str
    weight: float
    value: torch.Tensor


# --------------------------------------------------------------------------- registries


@hookspec
def prx_register_latent_spaces(registry: PluginRegistrar[Any]) -> None:
    """Register latent spaces (slot ``latent_space``): encode images in [0, 1] and decode back."""


@hookspec
def prx_register_text_encoders(registry: PluginRegistrar[Any]) -> None:
    """Register text encoders (slot ``text_encoder``): prompts to padded token states + mask."""


@hookspec
def prx_register_objectives(registry: PluginRegistrar[Any]) -> None:
    """Register training objectives (slot ``objective``): timesteps, targets, loss, velocity."""


@hookspec
def prx_register_token_routers(registry: PluginRegistrar[Any]) -> None:
    """Register token routers (slot ``router``), which skip image tokens over a block span."""


@hookspec
def prx_register_optimizers(registry: PluginRegistrar[Any]) -> None:
    """Register optimizers (slot ``optimizer``); the factory receives the run's trainable modules."""


@hookspec
def prx_register_precision_policies(registry: PluginRegistrar[Any]) -> None:
    """Register precision policies (slot ``precision``): the one place dtypes are decided."""


@hookspec
def prx_register_metrics(registry: PluginRegistrar[Any]) -> None:
    """Register evaluation metrics (slot ``metric``)."""


@hookspec
def prx_register_data_sources(registry: PluginRegistrar[Any]) -> None:
    """Register data sources (slot ``data``): deterministic, rank-sharded batches by step."""


@hookspec
def prx_register_trackers(registry: PluginRegistrar[Any]) -> None:
    """Register experiment trackers (slot ``tracker``)."""


# --------------------------------------------------------------------------- additive hooks


@hookspec
def prx_check_recipe(recipe: Recipe) -> list[str] | None:
    """Check the plugin's settings against the whole resolved recipe; return what is wrong.

    Called by ``prx-run check`` and at the start of every run through the same code path
    (:func:`prx_core.recipe.load` validates every recipe it returns), once every table is bound
    and ``requires``/``conflicts`` hold, before any model is built. So a recipe that ``check``
    accepts does not fail in its first seconds for a reason the recipe already states: a block
    index past ``model.depth``, a text width the encoder's weights do not have. Must stay cheap:
    no torch, no network; reading a local ``config.json`` is fine (see
    :mod:`prx_core.recipe_checks` for shared helpers).

    Return one message per problem (None or ``[]``: nothing wrong). A message is one line that
    starts with the recipe key it concerns, quoted, and gives the values, e.g.
    ``"'router.end' is 9, but model.depth = 4 has blocks 0..3"``; core prefixes the file that set
    that key and raises :class:`prx_core.config.RecipeError`. Raising ``RecipeError`` yourself
    works too. A plugin that provides a slot entry checks only when the recipe chose it
    (``recipe.slots["router"].use``); an additive plugin reads ``recipe.plugins[INFO.name]``.
    Messages are reported sorted, so plugin order does not matter.
    """


@hookspec
def prx_configure(run: RunContext) -> None:
    """Called once after the slots are built and before the denoiser runs.

    Read your validated config with ``run.plugin_config(INFO.name)`` and declare needs, such as
    ``run.capture_after_block(7)``. Declarations are sets, so order does not matter.
    """


@hookspec
def prx_build_modules(run: RunContext) -> Mapping[str, torch.nn.Module] | None:
    """Return extra trainable modules (a REPA projector, a SPRINT fusion layer).

    They are added before the optimizer and any sharding is built, live under
    ``run.trainable.extras[<name>]`` and are saved with the model. Names must be unique across
    plugins; core sorts them, so parameter order does not depend on plugin order, and it seeds
    torch's global generator from (recipe seed, plugin name) before each plugin's call, so
    initial weights do not depend on plugin order either.
    """


@hookspec
def prx_before_training(run: RunContext) -> None:
    """Called once after the trainable modules, optimizer and schedule exist, before a checkpoint
    is restored and before the first step (e.g. EMA copies the initial weights here)."""


@hookspec
def prx_loss_terms(step: StepContext) -> list[LossTerm] | None:
    """Return extra loss terms for this micro-step (after the denoiser forward)."""


@hookspec
def prx_after_optimizer_step(run: RunContext, step: int) -> None:
    """Called after each optimizer step (``step`` is the number of steps completed)."""


@hookspec
def prx_checkpoint_state(run: RunContext) -> Mapping[str, Stateful] | None:
    """Return objects whose ``state_dict``/``load_state_dict`` must survive a resume.

    Keys must be unique across plugins. Frozen pretrained networks do not belong here
    (reference.md §7.9): they reload from their weights.
    """


@hookspec
def prx_sampling_model(run: RunContext) -> torch.nn.Module | None:
    """Return the weights sampling and metrics should use instead of the trained ones (EMA).

    The module has the same structure as ``run.trainable``. At most one plugin may answer.
    """


@hookspec
def prx_precompute_features(run: RunContext, images_BCHW: torch.Tensor) -> Mapping[str, torch.Tensor] | None:
    """Return per-sample training targets that ``prx-run precompute`` stores next to the latents.

    Called by ``prx-run precompute --features`` on batches of clean images in [0, 1] of one bucket
    (``run`` has precision, data, latent space and text encoder built; no model, no trainable
    modules). Return the exact tensors the plugin would compute online before any per-step
    randomness, one row per image, under keys namespaced by the plugin
    (``"repa:<encoder>:<grid>"``). Training from the shards hands them back to loss hooks in
    ``StepContext.precomputed``. Keys must be unique across plugins.
    """


@hookspec
def prx_guidance(run: RunContext) -> Guidance | None:
    """Return a guidance rule that replaces classifier-free guidance at sampling time.

    At most one plugin may answer.
    """
