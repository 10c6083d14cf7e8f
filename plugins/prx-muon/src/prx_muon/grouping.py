"""Which parameters Muon trains and which AdamW trains (reference.md §4, Muon)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def is_muon_parameter(name: str, ndim: int, muon_patterns: Sequence[str], exclude_patterns: Sequence[str]) -> bool:
    """A 2-D weight whose name matches a Muon pattern and no exclude pattern.

    Patterns are shell-style (``fnmatch``, case-sensitive) over the full dotted name, where ``*``
    also crosses dots: ``model.blocks.*`` matches ``model.blocks.3.attention.img_qkv_proj.weight``.
    """
    if ndim != 2:
        return False
    if not any(fnmatchcase(name, pattern) for pattern in muon_patterns):
        return False
    return not any(fnmatchcase(name, pattern) for pattern in exclude_patterns)


def split_parameters(
    named: Iterable[tuple[str, torch.Tensor]],
    muon_patterns: Sequence[str],
    exclude_patterns: Sequence[str] = (),
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """Split ``(name, parameter)`` pairs into (Muon, AdamW), keeping their order.

    ``ndim`` is the logical one, so FSDP2-sharded parameters (DTensors) are grouped like the
    full matrices they represent.
    """
    muon: list[tuple[str, torch.Tensor]] = []
    adamw: list[tuple[str, torch.Tensor]] = []
    for name, param in named:
        target = muon if is_muon_parameter(name, param.ndim, muon_patterns, exclude_patterns) else adamw
        target.append((name, param))
    return muon, adamw
