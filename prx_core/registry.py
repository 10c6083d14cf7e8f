"""Typed registries for the exclusive slots.

A slot (latent space, text encoder, objective, …) holds exactly one entry per run, chosen by
name in the recipe (``[latent_space] use = "pixel"``). Plugins fill the registries through the
``prx_register_*`` hooks; because entries are picked by name, plugin order never decides which
implementation wins. Registering the same name twice is an error naming both plugins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prx_core.config import RecipeError, suggest

T = TypeVar("T")

#: Recipe table name -> hook suffix. The recipe table is the slot name.
SLOTS: dict[str, str] = {
    "latent_space": "prx_register_latent_spaces",
    "text_encoder": "prx_register_text_encoders",
    "objective": "prx_register_objectives",
    "router": "prx_register_token_routers",
    "optimizer": "prx_register_optimizers",
    "precision": "prx_register_precision_policies",
    "metric": "prx_register_metrics",
    "data": "prx_register_data_sources",
    "tracker": "prx_register_trackers",
}


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered implementation of a slot.

    ``factory(config, run)`` builds the object; ``config`` is the frozen dataclass that the
    rest of the slot's recipe table binds to (everything but ``use``).
    """

    slot: str
    name: str
    factory: Callable[..., T]
    config: type
    plugin: str


class SlotRegistry(Generic[T]):
    """Entries of one slot. Plugins see it through :meth:`for_plugin`, which records provenance."""

    def __init__(self, slot: str) -> None:
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        self.slot = slot
        self._entries: dict[str, Entry[T]] = {}

    def for_plugin(self, plugin: str) -> PluginRegistrar[T]:
        return PluginRegistrar(self, plugin)

    def add(self, entry: Entry[T]) -> None:
        if not dataclasses.is_dataclass(entry.config):
            raise TypeError(f"{entry.plugin}: config for {self.slot} '{entry.name}' must be a dataclass")
        previous = self._entries.get(entry.name)
        if previous is not None:
            raise RuntimeError(
                f"{self.slot} '{entry.name}' is registered twice: by plugin '{previous.plugin}' "
                f"and by plugin '{entry.plugin}'"
            )
        self._entries[entry.name] = entry

    def get(self, name: str, where: str = "recipe", key: str | None = None) -> Entry[T]:
        """The entry called ``name``; ``key`` is the recipe key that named it, for the message."""
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            raise RecipeError(
                f"{where}: '{key or self.slot + '.use'}' names unknown {self.slot} '{name}'{suggest(name, known)} "
                f"(available: {', '.join(known) or 'none'}; an installed plugin is only loaded when "
                "a recipe names it)"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in sorted(self._entries))


class PluginRegistrar(Generic[T]):
    """What a ``prx_register_*`` hookimpl receives: ``registry.register(name, factory, Config)``."""

    def __init__(self, registry: SlotRegistry[T], plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin
        self.slot = registry.slot

    def register(self, name: str, factory: Callable[..., T], config: type) -> None:
        self._registry.add(Entry(self.slot, name, factory, config, self.plugin))


def make_registries() -> dict[str, SlotRegistry[Any]]:
    return {slot: SlotRegistry(slot) for slot in SLOTS}
