"""What ``prx-run plugins -v`` and ``--json`` say about each plugin.

Listing imports nothing (:func:`prx_core.plugins.installed_plugins`); describing a plugin imports
its module (torch-free at import, CONTRIBUTING asks for it) and registers it alone with a fresh
plugin manager, so the slot entries it registers and the hooks it implements are read from the
plugin itself, never from a run.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from prx_core import __version__
from prx_core.hookspecs import PluginInfo
from prx_core.plugins import _new_manager, builtin_modules, installed_plugins, plugin_info
from prx_core.registry import SLOTS, make_registries


@dataclass
class PluginReport:
    name: str
    #: "core" (always active) or "installed" (active only when a recipe names it).
    kind: str
    distribution: str
    version: str
    module: str
    summary: str = ""
    spec: str = ""
    paper: str = ""
    #: ``"<slot>:<entry>"`` for every slot entry the plugin registers.
    entries: list[str] = field(default_factory=list)
    #: Additive hooks it implements (registry hooks show up as ``entries``).
    hooks: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    #: ``[plugins.<name>]`` settings with their defaults (additive plugins with a Config).
    config: dict[str, Any] = field(default_factory=dict)
    #: Why the plugin could not be described (it failed to import), else "".
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _defaults(config: type | None) -> dict[str, Any]:
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = list(f.default) if isinstance(f.default, tuple) else f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None  # required
    return out


def describe(module: Any, info: PluginInfo, report: PluginReport) -> PluginReport:
    """Fill ``report`` from the plugin module: registered with a manager of its own."""
    manager = _new_manager()
    manager.register(module, name=info.name)
    registry_hooks = {hook: slot for slot, hook in SLOTS.items()}
    registries = make_registries()
    hooks = []
    for caller in manager.get_hookcallers(module) or []:
        if caller.name in registry_hooks:
            slot = registry_hooks[caller.name]
            for impl in caller.get_hookimpls():
                impl.function(registry=registries[slot].for_plugin(info.name))
        else:
            hooks.append(caller.name)
    report.summary, report.spec, report.paper = info.summary, info.spec, info.paper
    report.entries = [f"{slot}:{entry.name}" for slot, registry in registries.items() for entry in registry]
    report.hooks = sorted(hooks)
    report.requires, report.conflicts = list(info.requires), list(info.conflicts)
    report.config = _defaults(info.config)
    return report


def plugin_reports() -> list[PluginReport]:
    """Core's builtins, then every installed plugin (sorted by name)."""
    reports = []
    for module in builtin_modules():
        info = plugin_info(module)
        base = PluginReport(info.name, "core", "prx-core", __version__, module.__name__)
        reports.append(describe(module, info, base))
    for name, installed in sorted(installed_plugins().items()):
        base = PluginReport(name, "installed", installed.distribution, installed.version, installed.module)
        try:
            module = importlib.import_module(installed.module)
            reports.append(describe(module, plugin_info(module, expected_name=name), base))
        except Exception as err:  # noqa: BLE001 - a broken plugin is reported, not fatal to the listing
            base.error = f"{type(err).__name__}: {err}"
            reports.append(base)
    return reports
