"""Strict binding of recipe tables to frozen dataclasses.

Every table in a recipe ends up in a dataclass: core's own sections and every plugin's
``Config``. Binding is strict because the reference trainer silently ignored misplaced keys
(reference.md §7.5): an unknown key or a wrong type is an error that names the file, the dotted key,
and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

C = TypeVar("C")


class RecipeError(ValueError):
    """A recipe (or an override) is invalid. The message names the file and the dotted key."""


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


Where = str | Callable[[str], str]


def _at(where: Where, key: str) -> str:
    """The source (file or ``--set``) of a dotted key, for error messages."""
    return where(key) if callable(where) else where


def coerce(value: Any, tp: Any, key: str, where: Where) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form.

    TOML has no tuples, so list values bind to ``tuple[...]`` fields; ints are accepted where a
    float is expected (``lr = 1`` is an honest float), never the other way round.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        members = get_args(tp)
        if value is None and type(None) in members:
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member, key, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(f"{_at(where, key)}: '{key}' must be {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = suggest(str(value), [str(a) for a in allowed])
            raise RecipeError(
                f"{_at(where, key)}: '{key}' must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}{hint}"
            )
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be bool, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be float, got {_describe(value)}")
        if not math.isfinite(float(value)):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be str, got {_describe(value)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be a list, got {_describe(value)}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise RecipeError(f"{_at(where, key)}: '{key}' must have {len(args)} items, got {len(value)}")
            items = [coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item_tp = args[0] if args else Any
            items = [coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be a table, got {_describe(value)}")
        args = get_args(tp)
        val_tp = args[1] if args else Any
        return {str(k): coerce(v, val_tp, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{_at(where, key)}: '{key}' must be a table, got {_describe(value)}")
        return bind(tp, value, prefix=key, where=where)
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def bind(cls: type[C], table: Mapping[str, Any], prefix: str = "", where: Where = "recipe") -> C:
    """Build the frozen dataclass ``cls`` from ``table``, rejecting unknown keys and bad types.

    ``prefix`` is the dotted path of the table inside the recipe, used in messages; ``where``
    names the file (or ``--set``) the values came from.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = f"{prefix}." if prefix else ""
    for key in table:
        if key not in fields:
            raise RecipeError(f"{_at(where, dotted + key)}: unknown key '{dotted}{key}'{suggest(key, fields)}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in table:
            kwargs[name] = coerce(table[name], hints[name], f"{dotted}{name}", where)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{_at(where, prefix)}: missing required key '{dotted}{name}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        # __post_init__ checks raise ValueError; re-raise with the table's location.
        raise RecipeError(f"{_at(where, prefix)}: invalid '{prefix or cls.__name__}': {err}") from err


def to_table(instance: Any) -> dict[str, Any]:
    """Inverse of :func:`bind`: a dataclass instance as a TOML-friendly dict (tuples → lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return typing.cast("dict[str, Any]", plain(instance))
