"""`prx-run` on a recipe shared through the Hub cache, offline: the run records its sources, a
resume reproduces the same resolved recipe after a cosmetic change and refuses a real one."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from prx_core.recipe import dump_toml
from prx_core.testing.fixtures import TINY_RECIPE

pytestmark = pytest.mark.integration
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REF = "hf://alice/prx-recipes/team/child.toml"
CHILD = 'extends = "base.toml"\nname = "hub-child"\n\n[eval]\nat_end = false\n'


def prx_run(*args: str, cwd: Path, hf_home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "prx_core.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_run_from_the_hub_cache_records_sources_and_checks_them_on_resume(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "models--alice--prx-recipes" / "snapshots" / COMMIT / "team"
    snapshot.mkdir(parents=True)
    base = dump_toml(copy.deepcopy(TINY_RECIPE))
    (snapshot / "base.toml").write_text(base)
    (snapshot / "child.toml").write_text(CHILD)
    (hf_home / "hub" / "models--alice--prx-recipes" / "refs").mkdir()
    (hf_home / "hub" / "models--alice--prx-recipes" / "refs" / "main").write_text(COMMIT)

    first = prx_run(REF, "--run-dir", "run", "--set", "train.steps=2", cwd=tmp_path, hf_home=hf_home)
    assert first.returncode == 0, first.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["source"] == REF
    assert info["recipe_sources"] == [
        {"source": REF, "sha256": hashlib.sha256(CHILD.encode()).hexdigest(), "commit": COMMIT},
        {
            "source": "hf://alice/prx-recipes/team/base.toml",
            "sha256": hashlib.sha256(base.encode()).hexdigest(),
            "commit": COMMIT,
        },
    ]
    resolved = tomllib.loads((tmp_path / "run" / "recipe.toml").read_text())
    assert resolved["name"] == "hub-child" and "prx-minilm" in resolved["requires"]

    # A changed source that resolves to the same recipe resumes (and says so in the log).
    (snapshot / "base.toml").write_text("# a comment\n" + base)
    again = prx_run(
        REF, "--run-dir", "run", "--resume", "auto", "--set", "train.steps=3", cwd=tmp_path, hf_home=hf_home
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "recipe sources changed since the run started" in (tmp_path / "run" / "train.log").read_text()

    # One that changes the resolved recipe is refused, naming the key and the changed source.
    (snapshot / "base.toml").write_text(base.replace("lr = 0.001", "lr = 0.01"))
    refused = prx_run(
        REF, "--run-dir", "run", "--resume", "auto", "--set", "train.steps=4", cwd=tmp_path, hf_home=hf_home
    )
    assert refused.returncode == 1
    assert "optimizer.lr" in refused.stderr
    assert "changed recipe sources: hf://alice/prx-recipes/team/base.toml (sha256" in refused.stderr

    # show and diff read the same reference.
    show = prx_run("show", REF, cwd=tmp_path, hf_home=hf_home)
    assert show.returncode == 0, show.stderr
    assert f"# source {REF} sha256 " in show.stdout and f"commit {COMMIT}" in show.stdout
    assert any(
        line.split("\t")[0].strip() == "hf://alice/prx-recipes/team/base.toml" and line.endswith("optimizer.lr = 0.01")
        for line in show.stdout.splitlines()
    )
    diff = prx_run("diff", "run", REF, "--set", "train.steps=3", cwd=tmp_path, hf_home=hf_home)
    assert diff.returncode == 1, diff.stderr
    assert diff.stdout.splitlines() == ["optimizer.lr: 0.001 -> 0.01"]
