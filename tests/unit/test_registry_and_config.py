"""Registries and strict config binding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from prx_core.config import RecipeError, bind, to_table
from prx_core.registry import SlotRegistry


@dataclass(frozen=True)
class Inner:
    depth: int = 2


@dataclass(frozen=True)
class Example:
    lr: float = 1e-4
    steps: int = 10
    name: str = "x"
    flag: bool = False
    betas: tuple[float, float] = (0.9, 0.95)
    mode: Literal["a", "b"] = "a"
    maybe: int | None = None
    weights: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)


def test_bind_accepts_valid_values_and_coerces() -> None:
    cfg = bind(Example, {"lr": 1, "betas": [0.8, 0.9], "weights": {"long": 1}, "inner": {"depth": 3}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.betas == (0.8, 0.9)
    assert cfg.weights == {"long": 1.0}
    assert cfg.inner == Inner(3)
    assert bind(Example, to_table(cfg)) == cfg


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"stesp": 3}, "unknown key 'opt.stesp'; did you mean 'steps'"),
        ({"steps": True}, "'opt.steps' must be int, got bool True"),
        ({"steps": 1.5}, "'opt.steps' must be int, got float 1.5"),
        ({"lr": "1e-4"}, "'opt.lr' must be float, got str"),
        ({"flag": 1}, "'opt.flag' must be bool"),
        ({"betas": [0.9]}, "'opt.betas' must have 2 items"),
        ({"mode": "c"}, "'opt.mode' must be one of 'a', 'b'"),
        ({"maybe": "x"}, "'opt.maybe' must be int | None"),
        ({"inner": {"dpth": 1}}, "unknown key 'opt.inner.dpth'; did you mean 'depth'"),
        ({"lr": float("nan")}, "must be finite"),
    ],
)
def test_bind_rejects_with_dotted_key(table: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        bind(Example, table, prefix="opt", where="file.toml")
    assert str(err.value).startswith("file.toml: ")
    assert message in str(err.value)


def test_where_can_be_per_key() -> None:
    with pytest.raises(RecipeError, match=r"^child.toml: unknown key 'opt.bad'"):
        bind(Example, {"bad": 1}, prefix="opt", where=lambda key: "child.toml" if key == "opt.bad" else "base.toml")


def test_registry_records_provenance_and_rejects_duplicates() -> None:
    registry: SlotRegistry[object] = SlotRegistry("optimizer")
    registry.for_plugin("one").register("sgd", lambda c, r: None, Inner)
    assert registry.get("sgd").plugin == "one"
    with pytest.raises(RuntimeError, match="registered twice: by plugin 'one' and by plugin 'two'"):
        registry.for_plugin("two").register("sgd", lambda c, r: None, Inner)
    with pytest.raises(RecipeError, match="unknown optimizer 'sgdd'; did you mean 'sgd'"):
        registry.get("sgdd")
    with pytest.raises(TypeError, match="must be a dataclass"):
        registry.for_plugin("one").register("adam", lambda c, r: None, dict)
    with pytest.raises(ValueError, match="unknown slot"):
        SlotRegistry("loss")
