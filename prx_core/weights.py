"""Reading plain weight files (safetensors, or tensors-only torch files) and checking them against a model.

Shared by every loader of a frozen network from a local file (vision teachers, FID's Inception, …):
``torch.load`` runs only with ``weights_only=True`` (pickled code never executes), and a file that
does not fit the model is reported with its missing, unexpected and mis-shaped keys instead of
being loaded half-way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

#: Tensors-only torch files; read with ``weights_only=True``.
TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class WeightsError(RuntimeError):
    """A weights file cannot be read, or does not fit the model it is meant for."""


def read_state_dict(
    path: Path,
    label: str,
    *,
    unwrap: Iterable[str] = ("state_dict",),
    error: type[Exception] = WeightsError,
) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``.safetensors`` or a tensors-only ``.pth``/``.pt``/``.bin``.

    ``label`` starts every error message (e.g. ``"fid: Inception weights"``); ``unwrap`` lists the
    container keys training checkpoints wrap their weights in; ``error`` is the exception raised.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
            raise error(f"{label} {path}: cannot read it as a tensors-only file ({type(err).__name__}: {err})") from err
    else:
        raise error(
            f"{label} {path}: unsupported file type {suffix!r}; use .safetensors (preferred) or one of "
            f"{', '.join(TORCH_SUFFIXES)}"
        )
    for key in unwrap:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{label} {path}: the file does not hold a flat tensor state dict")
    return dict(state)


def state_dict_problems(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    optional: Callable[[str], bool] = lambda key: False,
) -> str:
    """What keeps ``state`` from loading strictly into ``model`` ("" when it fits).

    ``optional`` keys of the model may be absent from the file (e.g. BatchNorm step counters).
    """
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state) if not optional(k))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )

    def head(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    return "; ".join(
        f"{label} {head(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    )
