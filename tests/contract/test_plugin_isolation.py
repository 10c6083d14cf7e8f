"""Only core's builtins and the plugins a recipe names are active (issue: core contract)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prx_core.plugins import installed_plugins
from prx_core.testing.fixtures import make_trainer, parameters_vector, run_steps, tiny_recipe


def test_fake_distribution_is_listed_but_not_imported(fake_site: Path, tmp_path: Path) -> None:
    plugins = installed_plugins()
    assert plugins["fake_loss"].version == "0.3.0"
    assert plugins["fake_loss"].distribution == "prx-fake-loss"
    recipe = tiny_recipe(tmp_path)
    assert "fake_loss" not in recipe.active.infos
    assert "prx_fake_loss" not in sys.modules


def test_installed_but_unnamed_plugin_does_not_change_a_run(fake_site: Path, tmp_path: Path) -> None:
    with_fake = make_trainer(tiny_recipe(tmp_path / "a"), tmp_path / "run_a")
    losses_with = run_steps(with_fake, 2)
    assert "prx_fake_loss" not in sys.modules
    sys.path.remove(str(fake_site))
    try:
        without = make_trainer(tiny_recipe(tmp_path / "b"), tmp_path / "run_b")
        losses_without = run_steps(without, 2)
    finally:
        sys.path.insert(0, str(fake_site))
    assert losses_with == losses_without
    assert parameters_vector(with_fake).equal(parameters_vector(without))


def test_named_plugin_is_activated_and_contributes(fake_site: Path, tmp_path: Path) -> None:
    plain = make_trainer(tiny_recipe(tmp_path / "a"), tmp_path / "run_a")
    named = make_trainer(tiny_recipe(tmp_path / "b", {"plugins": {"fake_loss": {"weight": 5.0}}}), tmp_path / "run_b")
    assert "prx_fake_loss" in sys.modules
    assert named.recipe.active.versions["fake_loss"] == "0.3.0"
    loss_plain = run_steps(plain, 1)[0]
    loss, terms, _ = named.train_step(0)
    assert set(terms) == {"fake_square"}
    assert loss.item() != loss_plain
    assert abs(loss.item() - (loss_plain + 5.0 * terms["fake_square"].item())) < 1e-5


def test_prx_run_plugins_lists_fake_plugin_fast_without_torch() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "fixtures" / "fake_site")}
    code = (
        "import sys, time; t = time.perf_counter(); from prx_core.cli import main; main(['plugins']); "
        "print('ELAPSED', time.perf_counter() - t); print('TORCH', 'torch' in sys.modules)"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    assert "fake_loss" in out and "prx-fake-loss" in out and "0.3.0" in out
    assert "flow_matching" in out and "synthetic_shapes" in out
    assert "TORCH False" in out
    assert wall < 3.0  # interpreter start included; the command itself is timed below
    assert float(out.split("ELAPSED")[1].split()[0]) < 1.0
