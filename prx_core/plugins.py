"""Plugin discovery and activation.

Two sources of plugins exist: core's builtins (always active, they provide the defaults) and
installed distributions that declare an entry point in group ``prx``. An installed plugin is
**only imported when a recipe names it**, either as a slot entry (``[optimizer] use = "muon"``)
or as an additive plugin table (``[plugins.ema]``). A plugin that is installed but not named
therefore cannot change a run, and a recipe can never name a module path: names resolve through
entry points only.

This module does not import torch, so ``prx-run plugins`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from prx_core import ENTRY_POINT_GROUP, PROJECT_NAME, __version__, hookspecs
from prx_core.config import RecipeError, suggest
from prx_core.hookspecs import PluginInfo
from prx_core.registry import SLOTS, SlotRegistry, make_registries

#: Core's own plugins. Each module is torch-free at import and holds ``INFO`` plus hookimpls.
BUILTIN_MODULES: tuple[str, ...] = (
    "prx_core.builtins.flow_matching",
    "prx_core.builtins.pixel",
    "prx_core.builtins.adamw",
    "prx_core.builtins.precision",
    "prx_core.builtins.console",
    "prx_core.builtins.synthetic_shapes",
    "prx_core.builtins.precomputed",
)


@dataclass(frozen=True)
class InstalledPlugin:
    """An entry point in group ``prx``, read from metadata without importing it."""

    name: str
    module: str
    distribution: str
    version: str


@dataclass
class ActivePlugins:
    """The plugin manager for one run, with the registries its active plugins filled."""

    manager: pluggy.PluginManager
    infos: dict[str, PluginInfo]
    versions: dict[str, str]
    builtin: frozenset[str]
    registries: dict[str, SlotRegistry[Any]] = field(default_factory=make_registries)

    def versions_table(self) -> dict[str, str]:
        return dict(sorted(self.versions.items()))


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Entry points in group ``prx``. Importing nothing: this must stay cheap and side-effect free."""
    found: dict[str, InstalledPlugin] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        found[ep.name] = InstalledPlugin(
            name=ep.name,
            module=ep.value,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
        )
    return found


def builtin_modules() -> list[ModuleType]:
    return [importlib.import_module(name) for name in BUILTIN_MODULES]


def plugin_info(module: ModuleType, expected_name: str | None = None) -> PluginInfo:
    info = getattr(module, "INFO", None)
    if not isinstance(info, PluginInfo):
        raise RuntimeError(f"plugin module '{module.__name__}' has no INFO = PluginInfo(...)")
    if expected_name is not None and info.name != expected_name:
        raise RuntimeError(
            f"entry point '{expected_name}' loads module '{module.__name__}' whose INFO.name is "
            f"'{info.name}'; they must match so recipes can name the plugin"
        )
    return info


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


def _fill_registries(active: ActivePlugins, plugin_names: Iterable[str]) -> None:
    """Call each registry hook of the given plugins, telling the registry who registers."""
    wanted = set(plugin_names)
    for slot, hook_name in SLOTS.items():
        hook = getattr(active.manager.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin_name in wanted:
                impl.function(registry=active.registries[slot].for_plugin(impl.plugin_name))


def activate(
    slot_choices: dict[str, str],
    plugin_tables: Iterable[str],
    where: str = "recipe",
    metric_names: Iterable[str] = (),
) -> ActivePlugins:
    """Build the plugin manager for a recipe.

    ``slot_choices`` maps slot -> chosen entry name; ``plugin_tables`` are the names under
    ``[plugins.*]``; ``metric_names`` the names under ``[metrics.*]`` (entries of the metric
    slot). Builtins are always registered; an installed plugin is loaded when a slot choice or a
    metric is not a builtin entry and an entry point of that name exists, or when it has a
    ``[plugins.<name>]`` table.
    """
    manager = _new_manager()
    active = ActivePlugins(manager=manager, infos={}, versions={}, builtin=frozenset())
    builtin_names = []
    for module in builtin_modules():
        info = plugin_info(module)
        manager.register(module, name=info.name)
        active.infos[info.name] = info
        active.versions[info.name] = __version__
        builtin_names.append(info.name)
    active.builtin = frozenset(builtin_names)
    _fill_registries(active, builtin_names)

    wanted: dict[str, str] = {}
    for slot, name in sorted(slot_choices.items()):
        if name not in active.registries[slot].names():
            wanted.setdefault(name, f"{slot}.use")
    for name in sorted(metric_names):
        if name not in active.registries["metric"].names():
            wanted.setdefault(name, f"metrics.{name}.use")
    for name in sorted(plugin_tables):
        if name not in active.builtin:
            wanted.setdefault(name, f"plugins.{name}")

    installed = installed_plugins()
    loaded = []
    for name, key in sorted(wanted.items()):
        plugin = installed.get(name)
        if plugin is None:
            if key.endswith(".use"):
                # Let the registry produce the "unknown entry" message with its known names.
                continue
            known = sorted(set(installed) | active.builtin)
            raise RecipeError(
                f"{where}: '{key}' names plugin '{name}', which is not installed{suggest(name, known)} "
                f"(installed: {', '.join(sorted(installed)) or 'none'})"
            )
        module = importlib.import_module(plugin.module)
        info = plugin_info(module, expected_name=name)
        manager.register(module, name=name)
        active.infos[name] = info
        active.versions[name] = plugin.version
        loaded.append(name)
    _fill_registries(active, loaded)
    return active
