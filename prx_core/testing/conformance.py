"""The conformance suite every plugin runs (CONTRIBUTING.md, "Adding a plugin").

Subclass :class:`PluginConformance` in a test module, set ``plugin`` (the entry-point name) and
``recipe_patch`` (what turns the plugin on in the tiny recipe), and pytest collects:

* registers cleanly: the plugin loads through its entry point, declares ``INFO`` and a strict
  config, and is inactive when the recipe does not name it;
* its config round-trips through the resolved recipe;
* two training steps run and give finite losses;
* save/resume reproduces the next step bitwise;
* reversing plugin order gives the same loss bitwise;
* no hooks are left behind: no torch module hooks, no patched diffusers classes, no changed
  global torch state.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from prx_core.config import bind, to_table
from prx_core.plugins import installed_plugins
from prx_core.testing.fixtures import (
    TINY_RECIPE,
    make_trainer,
    parameters_vector,
    reverse_plugin_order,
    run_steps,
    tiny_recipe,
)


def _class_snapshot() -> dict[str, dict[str, Any]]:
    import diffusers.models.transformers.transformer_prx as prx

    classes = [
        prx.PRXTransformer2DModel,
        prx.PRXBlock,
        prx.PRXAttention,
        prx.PRXAttnProcessor2_0,
        prx.FinalLayer,
    ]
    return {cls.__name__: dict(vars(cls)) for cls in classes}


def _global_torch_state() -> dict[str, Any]:
    return {
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(),
    }


class PluginConformance:
    plugin: ClassVar[str] = ""
    recipe_patch: ClassVar[dict[str, Any]] = {}

    def _recipe(self, tmp_path: Path, extra: dict[str, Any] | None = None) -> Any:
        from prx_core.recipe import deep_merge

        return tiny_recipe(tmp_path / "recipe", deep_merge(dict(self.recipe_patch), extra or {}))

    def test_registers_cleanly(self, tmp_path: Path) -> None:
        recipe = self._recipe(tmp_path)
        assert self.plugin in recipe.active.infos, f"recipe_patch does not activate '{self.plugin}'"
        info = recipe.active.infos[self.plugin]
        assert info.name == self.plugin
        assert info.summary, "INFO.summary is empty"
        if self.plugin not in recipe.active.builtin:
            assert self.plugin in installed_plugins(), f"'{self.plugin}' has no entry point in group 'prx'"
        if self.plugin not in recipe.active.builtin and self.plugin not in _named_by_tiny_recipe():
            plain = tiny_recipe(tmp_path / "plain", _without_plugin(self.recipe_patch, self.plugin))
            assert self.plugin not in plain.active.infos, "plugin is active although the recipe does not name it"
        if info.config is not None:
            assert dataclasses.is_dataclass(info.config)
            params: Any = getattr(info.config, "__dataclass_params__", None)
            assert params is not None and params.frozen, "plugin Config must be a frozen dataclass"

    def test_config_round_trips(self, tmp_path: Path) -> None:
        recipe = self._recipe(tmp_path)
        configs = [c.config for c in recipe.slots.values() if c.plugin == self.plugin]
        if recipe.plugins.get(self.plugin) is not None:
            configs.append(recipe.plugins[self.plugin])
        for config in configs:
            again = bind(type(config), to_table(config))
            assert again == config
        # And the whole resolved recipe loads back to the same resolved recipe.
        resolved = recipe.resolved()
        from prx_core.recipe import dump_toml, load

        path = tmp_path / "resolved.toml"
        path.write_text(dump_toml(resolved), encoding="utf-8")
        assert load(path).resolved() == resolved

    def test_two_training_steps(self, tmp_path: Path) -> None:
        trainer = make_trainer(self._recipe(tmp_path), tmp_path / "run")
        losses = run_steps(trainer, 2)
        assert all(math.isfinite(x) for x in losses), losses

    def test_resume_reproduces_next_step(self, tmp_path: Path) -> None:
        first = make_trainer(self._recipe(tmp_path), tmp_path / "run")
        run_steps(first, 1)
        first.save()
        expected = run_steps(first, 1)
        expected_params = parameters_vector(first)
        second = make_trainer(self._recipe(tmp_path), tmp_path / "run", resume="auto")
        assert second.step == 1
        assert run_steps(second, 1) == expected
        assert torch.equal(parameters_vector(second), expected_params)

    def test_plugin_order_does_not_change_loss(self, tmp_path: Path) -> None:
        forward = make_trainer(self._recipe(tmp_path), tmp_path / "a")
        expected = run_steps(forward, 2)
        recipe = self._recipe(tmp_path)
        reverse_plugin_order(recipe)
        backward = make_trainer(recipe, tmp_path / "b")
        assert run_steps(backward, 2) == expected
        assert torch.equal(parameters_vector(backward), parameters_vector(forward))

    def test_leaves_no_hooks_behind(self, tmp_path: Path) -> None:
        classes, state = _class_snapshot(), _global_torch_state()
        trainer = make_trainer(self._recipe(tmp_path), tmp_path / "run")
        run_steps(trainer, 1)
        trainer.write_samples(trainer.step)
        for name, module in trainer.run.require("trainable").named_modules():
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                assert not getattr(module, kind), f"module '{name}' keeps {kind} after the step"
        assert _class_snapshot() == classes, "a diffusers PRX class was patched"
        assert _global_torch_state() == state, "global torch state changed"


def _named_by_tiny_recipe() -> set[str]:
    return {table["use"] for table in TINY_RECIPE.values() if isinstance(table, dict) and "use" in table}


def _without_plugin(patch: dict[str, Any], plugin: str) -> dict[str, Any]:
    """The recipe patch with the plugin's own table (``[plugins.x]``, ``[metrics.x]``) or slot choice removed."""
    out = {k: v for k, v in patch.items() if k not in ("plugins", "metrics")}
    for section in ("plugins", "metrics"):  # additive tables and metric entries are named by their key
        others = {k: v for k, v in patch.get(section, {}).items() if k != plugin}
        if others:
            out[section] = others
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and v.get("use") == plugin)}
