"""A plugin package written outside the repo and installed with pip is listed, but stays inactive
until a recipe names it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prx_core.testing.fixtures import write_recipe

pytestmark = pytest.mark.integration

PLUGIN = '''
"""An outside plugin: adds a constant to the loss, and says when it is imported."""
from dataclasses import dataclass
import os
from prx_core import hookimpl
from prx_core.hookspecs import LossTerm, PluginInfo

open(os.environ["OUTSIDE_MARKER"], "a").write("imported\\n")


@dataclass(frozen=True)
class Config:
    bonus: float = 1.0


INFO = PluginInfo(name="outside", summary="outside test plugin", config=Config)


@hookimpl
def prx_loss_terms(step):
    cfg = step.run.plugin_config("outside")
    return [LossTerm("outside", 1.0, step.prediction_BCHW.sum() * 0 + cfg.bonus)]
'''


def test_pip_installed_outside_plugin_is_listed_and_inactive_until_named(tmp_path: Path) -> None:
    source = tmp_path / "prx-outside"
    (source / "prx_outside").mkdir(parents=True)
    (source / "prx_outside" / "__init__.py").write_text(PLUGIN)
    (source / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "prx-outside"
            version = "2.5.0"
            [project.entry-points.prx]
            outside = "prx_outside"
            """
        )
    )
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    marker = tmp_path / "imported.txt"
    env = {**os.environ, "PYTHONPATH": str(target), "OUTSIDE_MARKER": str(marker), "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "prx_core.cli", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    listed = run("plugins")
    assert "outside" in listed.stdout and "2.5.0" in listed.stdout and "prx-outside" in listed.stdout
    assert not marker.exists(), "listing must not import plugins"

    plain = write_recipe(tmp_path, {"train": {"steps": 1}}, name="plain.toml")
    assert run(str(plain), "--run-dir", "plain").returncode == 0
    assert not marker.exists(), "an unnamed plugin was imported during a run"

    named = write_recipe(tmp_path, {"train": {"steps": 1}, "plugins": {"outside": {"bonus": 3.0}}}, name="named.toml")
    result = run(str(named), "--run-dir", "named")
    assert result.returncode == 0, result.stderr
    assert marker.exists()
    import json

    line = json.loads((tmp_path / "named" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["loss/outside"] == 3.0
    plain_line = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(line["loss"] - (plain_line["loss"] + 3.0)) < 1e-4
    info = json.loads((tmp_path / "named" / "run.json").read_text())
    assert info["plugins"]["outside"] == "2.5.0"
