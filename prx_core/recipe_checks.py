"""Helpers for ``prx_check_recipe`` implementations: recipe-level checks that need no model.

Torch-free and offline, like every recipe check: ``prx-run check`` imports each named plugin
and calls its ``prx_check_recipe(recipe)`` (see :mod:`prx_core.hookspecs`). Each helper returns
the one-line message the hook returns, starting with the quoted recipe key, or None when the
value is fine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def block_index_problem(key: str, index: int, depth: int, why: str = "") -> str | None:
    """A 0-based denoiser block index (``router.end``, ``plugins.repa.layer``) must be < ``model.depth``."""
    if index < depth:
        return None
    tail = f"; {why}" if why else ""
    return f"'{key}' is {index}, but model.depth = {depth} has blocks 0..{depth - 1}{tail}"


def model_config_json(path: str, subfolder: str = "") -> tuple[dict[str, Any], str] | None:
    """``(config, file)``: a model's ``config.json`` read as JSON, from a local directory or from a
    hub id already in the local Hugging Face cache; None when neither has it.

    Never downloads, never imports torch or transformers: a recipe check must stay fast and offline.
    """
    local = Path(path).expanduser() / subfolder / "config.json"
    if local.is_file():
        return _read_config(local)
    if Path(path).expanduser().exists() or path.count("/") != 1:
        return None  # a local folder without a config, or not a hub id ("org/name")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    filename = f"{subfolder.strip('/')}/config.json" if subfolder else "config.json"
    try:
        cached = try_to_load_from_cache(path, filename)
    except ValueError:  # not a valid repo id after all
        return None
    return _read_config(Path(cached)) if isinstance(cached, str) else None


def _read_config(file: Path) -> tuple[dict[str, Any], str] | None:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable here; loading the weights reports it with the loader's own message
    return (config, str(file)) if isinstance(config, dict) else None


def text_width_problem(encoder: str, dim: int, width: Any, file: str) -> str | None:
    """``text_encoder.dim`` must equal the width the encoder's weights produce (``width``, read from ``file``)."""
    if not isinstance(width, int) or isinstance(width, bool) or width == dim:
        return None
    return (
        f"'text_encoder.dim' is {dim}, but {encoder}'s weights ({file}) produce {width}-d token states; "
        f"set text_encoder.dim = {width}"
    )


def chosen_config(recipe: Any, slot: str, entry: str) -> Any | None:
    """The ``[slot]`` table's bound config when the recipe chose ``entry`` for that slot, else None."""
    choice = recipe.slots.get(slot)
    return choice.config if choice is not None and choice.use == entry else None


def router_span_problems(recipe: Any, entry: str) -> list[str]:
    """A token router's ``[router] end`` must name a block of the model (the span is inclusive)."""
    config = chosen_config(recipe, "router", entry)
    if config is None:
        return []
    problem = block_index_problem(
        "router.end", config.end, recipe.model.depth, "the routed span start..end is inclusive"
    )
    return [problem] if problem else []


def encoder_width_problems(
    encoder: str, dim: int, path: str, subfolder: str = "", nested: dict[str, str | None] | None = None
) -> list[str]:
    """``text_encoder.dim`` against the ``hidden_size`` in the weights' local ``config.json``.

    ``nested`` maps the ``model_type`` values this encoder accepts to the key holding the text
    model's own config (``None``: the config is flat); a checkpoint of another type is left to
    the loader, whose message names it. Without ``nested`` any config is read flat.
    """
    found = model_config_json(path, subfolder)
    if found is None:
        return []
    model_config, file = found
    if nested is not None:
        model_type = model_config.get("model_type")
        if model_type not in nested:
            return []
        key = nested[model_type]
        if key is not None:
            model_config = model_config.get(key) or {}
    problem = text_width_problem(encoder, dim, model_config.get("hidden_size"), file)
    return [problem] if problem else []
