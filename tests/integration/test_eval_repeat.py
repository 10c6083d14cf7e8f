"""`prx-run eval --repeat K`: the same weights under K evaluation seeds, each result and the spread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prx_core.testing.fixtures import write_recipe

from .test_cli import prx_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _installed(name: str) -> bool:
    from prx_core.plugins import installed_plugins

    return name in installed_plugins()


def test_eval_repeat_evaluates_under_consecutive_seeds_and_writes_the_spread(tmp_path: Path) -> None:
    metrics = {"shapes_adherence": {}} if _installed("shapes_adherence") else {}
    recipe = write_recipe(
        tmp_path,
        {
            "train": {"steps": 2, "checkpoint_every": 2},
            "eval": {"num_samples": 4, "batch": 4, "steps": 2, "t_bins": 2, "seed": 7},
            "metrics": metrics,
        },
    )
    prx_run(str(recipe), "--run-dir", "run", "--quiet", cwd=tmp_path)
    run = tmp_path / "run"
    result = prx_run("eval", str(run), "--repeat", "2", cwd=tmp_path)

    first = json.loads((run / "eval" / "step_00000002_seed7.json").read_text())
    second = json.loads((run / "eval" / "step_00000002_seed8.json").read_text())
    assert (first["step"], first["eval_seed"], second["eval_seed"]) == (2, 7, 8)
    # eval seed 7 is the recipe's own: the same numbers as the end-of-training evaluation
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert first["eval/loss"] == pytest.approx(last["eval/loss"], rel=1e-6)
    # another seed draws other validation noise (and other images): another value
    assert second["eval/loss"] != pytest.approx(first["eval/loss"], rel=1e-6)

    summary = json.loads((run / "eval" / "step_00000002_spread.json").read_text())
    assert summary["eval_seeds"] == [7, 8] and [r["eval_seed"] for r in summary["repeats"]] == [7, 8]
    keys = [k for k in first if k.startswith("eval/")]
    assert sorted(summary["spread"]) == sorted(keys)
    for key in keys:
        a, b = first[key], second[key]
        stat = summary["spread"][key]
        # two values: mean (a + b) / 2, sample std √(((a − m)² + (b − m)²) / 1) = |a − b| / √2
        assert stat["mean"] == pytest.approx((a + b) / 2, rel=1e-12)
        assert stat["std"] == pytest.approx(abs(a - b) / math.sqrt(2), rel=1e-9, abs=1e-15)
        assert (stat["min"], stat["max"]) == (min(a, b), max(a, b))
    if metrics:
        assert "eval/shapes_adherence" in summary["spread"]
    assert "key\tmean\tstd\tmin\tmax" in result.stdout
    assert any(line.startswith("eval/loss\t") and line.count("\t") == 4 for line in result.stdout.splitlines())

    refused = prx_run("eval", str(run), "--repeat", "0", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "must be >= 1" in refused.stderr
