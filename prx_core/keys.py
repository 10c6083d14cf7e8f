"""Typed keys for data that plugins share without importing each other.

The idea is pytest's ``Stash``: core declares a key once, with the value type; one plugin
writes, another reads, and neither names the other. The stash of a training step is cleared
before each forward pass, so nothing leaks from one micro-step into the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key whose type parameter says what lives under it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """A per-step mapping from :class:`StashKey` to values."""

    def __init__(self) -> None:
        self._values: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        try:
            return cast("T", self._values[key])
        except KeyError:
            raise KeyError(
                f"{key!r} was not published in this step; the plugin that needs it must declare "
                "`requires` on the plugin that writes it"
            ) from None

    @overload
    def get(self, key: StashKey[T]) -> T | None: ...
    @overload
    def get(self, key: StashKey[T], default: D) -> T | D: ...
    def get(self, key: StashKey[T], default: Any = None) -> Any:
        return self._values.get(key, default)

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._values

    def clear(self) -> None:
        self._values.clear()


@dataclass(frozen=True)
class RoutePlan:
    """Which image tokens a token router keeps visible inside its block span.

    ``visible_idx_BK`` holds, per sample, the sorted indices (into the full image sequence of
    length ``full_length``) of the tokens that run through blocks ``start..end``.
    """

    visible_idx_BK: torch.Tensor
    full_length: int
    start: int
    end: int


#: The objective's estimate of the clean sample x̂0, in latent space, shape [B, C, H, W].
X0_PREDICTION: StashKey[torch.Tensor] = StashKey("x0_prediction")
#: The route plan of the active token router, when one routes this step.
ROUTE_PLAN: StashKey[RoutePlan] = StashKey("route_plan")
#: Image tokens captured after a block, keyed by block index; tokens are [B, L_visible, H].
CAPTURED_FEATURES: StashKey[dict[int, torch.Tensor]] = StashKey("captured_features")


def captured_block(stash: Stash, layer: int, plugin: str) -> torch.Tensor:
    """Block ``layer``'s output tokens from this forward, with an error naming the plugin that
    needed them when the block was not captured (it must call ``run.capture_after_block``)."""
    captured = stash.get(CAPTURED_FEATURES, {})
    if layer not in captured:
        raise RuntimeError(f"{plugin}: block {layer} was not captured in this forward pass")
    return captured[layer]
