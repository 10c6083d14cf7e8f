"""Fine-tuning: ``[model] init`` starts a fresh run from existing denoiser weights.

``init`` names one of:

* a diffusers ``PRXTransformer2DModel`` folder (what ``prx-run export`` and a run's
  ``final/transformer`` hold), with ``subfolder`` when the transformer sits inside a pipeline
  folder (``"transformer"``);
* a Hugging Face Hub id (e.g. ``Photoroom/prx-256-t2i`` with ``subfolder = "transformer"`` and an
  optional ``revision``), downloaded through the hub cache, which honours ``HF_HUB_OFFLINE``;
* ``run:RUN_DIR``: another prx run's newest valid checkpoint (its final one once it finished),
  weights only, its EMA average instead with ``init_ema = true``.

The checkpoint's architecture must agree with ``[model]``. Where its config can be read without
a download (a local folder, a run directory, or a hub file already in the cache), recipe
validation fills the keys the recipe leaves unset and refuses keys set to another value, naming
each (:func:`agree_with_init`), so ``prx-run check`` catches a mismatch before any model exists.
The trainer compares again against the config it actually loads (:func:`load_init_weights`).
``init`` applies at a fresh start only: a resume reads its own checkpoint and never the init source.

The module-level code is torch-free (recipe checks import it); loading imports torch lazily.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prx_core.config import RecipeError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("prx")

RUN_PREFIX = "run:"
#: ``[model]`` keys that say where the weights come from, not what the network is.
INIT_KEYS = ("init", "subfolder", "revision", "init_ema")
#: The EMA plugin's key in a checkpoint's plugin states (``init_ema`` reads it).
EMA_STATE_KEY = "ema"


def run_dir_of(init: str) -> Path | None:
    """``RUN_DIR`` of ``init = "run:RUN_DIR"``, else None."""
    return Path(init[len(RUN_PREFIX) :]) if init.startswith(RUN_PREFIX) else None


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def local_init_config(init: str, subfolder: str, revision: str | None) -> tuple[dict[str, Any], str] | None:
    """The init checkpoint's architecture and where it was read, when readable without a download.

    None when it is not: a hub id not in the local cache, or a path that does not exist (any
    more: a resumed fine-tune never reads its init source, so its recipe must still load; a fresh
    start then fails at setup, naming the path).
    """
    run_dir = run_dir_of(init)
    if run_dir is not None:
        resolved = run_dir / "recipe.toml"
        if not resolved.is_file():
            return None
        with resolved.open("rb") as handle:
            return dict(tomllib.load(handle).get("model", {})), str(resolved)
    if Path(init).exists():
        folder = Path(init) / subfolder if subfolder else Path(init)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise RecipeError(
                f"'model.init' = {init!r}: {config_file} is missing (a PRXTransformer2DModel folder holds "
                'config.json; inside a pipeline folder set model.subfolder = "transformer")'
            )
        return json.loads(config_file.read_text(encoding="utf-8")), str(config_file)
    if init.count("/") != 1 or init.startswith((".", "/", "~")):
        return None  # not a hub id 'owner/name' either: setup reports it
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    cached = try_to_load_from_cache(init, filename, revision=revision)
    if not isinstance(cached, str):
        return None
    return json.loads(Path(cached).read_text(encoding="utf-8")), f"{init} (hub cache: {cached})"


def agree_with_init(table: Mapping[str, Any], fields: list[str], where: Callable[[str], str]) -> dict[str, Any]:
    """The recipe's ``[model]`` table with the architecture keys it leaves unset taken from the
    init checkpoint's config; keys it sets must agree (each differing one is named).

    ``table`` is ``[model]`` as written (after ``extends`` and ``--set``), before binding, so a
    recipe may state only ``init``; ``fields`` are ``ModelConfig``'s. Returned unchanged when there
    is no ``init`` or its config is not readable without a download (setup checks it then).
    """
    init, subfolder, revision = table.get("init", ""), table.get("subfolder", ""), table.get("revision")
    if not init or not isinstance(init, str) or not isinstance(subfolder, str):
        return dict(table)  # binding reports a wrong type
    found = local_init_config(init, subfolder, revision if isinstance(revision, str) else None)
    if found is None:
        return dict(table)
    checkpoint, source = found
    keys = [k for k in fields if k not in INIT_KEYS and k in checkpoint]
    clashes = [
        f"{k} = {table[k]!r} (checkpoint: {checkpoint[k]!r})"
        for k in keys
        if k in table and _normalise(table[k]) != _normalise(checkpoint[k])
    ]
    if clashes:
        raise RecipeError(
            f"{where('model.init')}: [model] disagrees with the init checkpoint {source}: {'; '.join(clashes)}. "
            "Remove these keys to take the checkpoint's values, or point model.init at a matching checkpoint"
        )
    return {**{k: checkpoint[k] for k in keys if checkpoint[k] is not None}, **table}


def init_status(model_config: Any) -> str:
    """``init`` for ``prx-run check``'s summary: whether its architecture was checked here."""
    found = local_init_config(model_config.init, model_config.subfolder, model_config.revision)
    if found is None:
        return f"{model_config.init} (config not local: compared with [model] when a run starts)"
    return f"{model_config.init} (architecture agrees with {found[1]})"


# --------------------------------------------------------------------------- loading (torch)


def _check_architecture(model: Any, checkpoint: Mapping[str, Any], source: str) -> None:
    """Refuse a checkpoint whose architecture differs from the model the trainer built."""
    built = dict(model.config)
    clashes = [
        f"{key} = {built[key]!r} (checkpoint: {checkpoint[key]!r})"
        for key in sorted(set(built) & set(checkpoint))
        if not key.startswith("_") and _normalise(built[key]) != _normalise(checkpoint[key])
    ]
    if clashes:
        from prx_core.errors import TrainingError

        raise TrainingError(
            f"model.init: the checkpoint {source} does not fit [model]: {'; '.join(clashes)}. Set these [model] "
            "keys to the checkpoint's values (prx-run check fills them when the checkpoint is local)"
        )


def _run_checkpoint(run_dir: Path) -> Any:
    """The newest valid checkpoint of a run directory (of its last stage that has one, for a staged run)."""
    from prx_core.checkpoint import CheckpointError, resolve_checkpoint

    candidates = [run_dir]
    stages = run_dir / "stages.json"
    if stages.is_file():
        entries = json.loads(stages.read_text(encoding="utf-8")).get("stages", [])
        candidates = [run_dir / entry["dir"] for entry in reversed(entries)] + candidates
    reasons = []
    for candidate in candidates:
        try:
            return resolve_checkpoint(candidate)
        except CheckpointError as err:
            reasons.append(str(err))
    from prx_core.errors import TrainingError

    raise TrainingError(f"model.init = 'run:{run_dir}': no checkpoint to start from ({'; '.join(reasons)})")


def _run_weights(model_config: Any, run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The denoiser weights (trained or EMA) and the ``[model]`` table of a run's newest checkpoint."""
    from prx_core.checkpoint import CheckpointManager
    from prx_core.errors import TrainingError
    from prx_core.trainer import upgrade_payload

    info = _run_checkpoint(run_dir)
    parts, meta = CheckpointManager(info.path.parent).load(info, device="cpu")
    parts, meta = upgrade_payload(parts, meta, info.path)
    if model_config.init_ema:
        state = parts["plugins"].get(EMA_STATE_KEY)
        if state is None:
            raise TrainingError(
                f"model.init_ema: checkpoint {info.path} holds no EMA weights (that run had no [plugins.ema]); "
                "set model.init_ema = false to start from its trained weights"
            )
        source = f"{info.path} (EMA weights)"
    else:
        state, source = parts["trainable"], str(info.path)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return weights, dict(meta.get("recipe", {}).get("model", {})), source


def load_init_weights(model: torch.nn.Module, model_config: Any) -> str:
    """Copy the ``init`` checkpoint's weights into ``model`` (built from ``[model]``); returns the source.

    Every parameter and buffer must be present with the same shape; the copy casts to the dtype
    the model was built in (the precision policy's weight dtype).
    """
    from prx_core.errors import TrainingError

    run_dir = run_dir_of(model_config.init)
    if run_dir is not None:
        weights, saved_model, source = _run_weights(model_config, run_dir)
        _check_architecture(model, saved_model, source)
    else:
        from diffusers import PRXTransformer2DModel

        location = {"subfolder": model_config.subfolder or None, "revision": model_config.revision}
        try:
            config = PRXTransformer2DModel.load_config(model_config.init, **location)
            _check_architecture(model, config, model_config.init)
            pretrained = PRXTransformer2DModel.from_pretrained(model_config.init, **location)
        except (OSError, ValueError) as err:
            raise TrainingError(f"cannot load model.init {model_config.init!r}: {err}") from err
        weights, source = pretrained.state_dict(), model_config.init
        if model_config.subfolder:
            source = f"{source} (subfolder {model_config.subfolder})"
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise TrainingError(f"model.init: the weights of {source} do not fit [model]: {err}") from err
    logger.info("model initialised from %s", source)
    return source
