"""`prx-run sample`, `eval` and `export` on a finished tiny run, and evaluation during training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prx_core.testing.fixtures import write_recipe

from .test_cli import prx_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(
        root,
        {
            "train": {"steps": 3, "checkpoint_every": 3},
            "eval": {"every": 2, "num_samples": 6, "batch": 4, "steps": 2, "t_bins": 4},
            "metrics": {"shapes_adherence": {}} if _installed("shapes_adherence") else {},
        },
    )
    prx_run(str(recipe), "--run-dir", "run", cwd=root)
    return root / "run"


def _installed(name: str) -> bool:
    from prx_core.plugins import installed_plugins

    return name in installed_plugins()


def test_training_logs_validation_loss_per_t_bin(finished_run: Path) -> None:
    lines = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval/loss" in x]
    assert [x["step"] for x in evals] == [2, 3]
    bins = [k for k in evals[0] if k.startswith("eval/loss/t")]
    assert bins == ["eval/loss/t0.00-0.25", "eval/loss/t0.25-0.50", "eval/loss/t0.50-0.75", "eval/loss/t0.75-1.00"]
    assert abs(sum(evals[0][k] for k in bins) / 4 - evals[0]["eval/loss"]) < 1e-9
    if _installed("shapes_adherence"):
        assert 0.0 <= evals[-1]["eval/shapes_adherence"] <= 1.0


def test_eval_command_reproduces_the_end_of_training_evaluation(finished_run: Path, tmp_path: Path) -> None:
    result = prx_run("eval", str(finished_run), cwd=tmp_path)
    written = json.loads((finished_run / "eval" / "step_00000003.json").read_text())
    last = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert written["eval/loss"] == pytest.approx(last["eval/loss"], rel=1e-6)
    assert "eval/loss\t" in result.stdout


def test_sample_command_writes_pngs(finished_run: Path, tmp_path: Path) -> None:
    result = prx_run(
        "sample",
        str(finished_run),
        "--prompt",
        "A large red circle in the center, on a gray background.",
        "--prompt",
        "A small blue square at the top, on a black background.",
        "--steps",
        "3",
        "--out",
        "out",
        cwd=tmp_path,
    )
    from PIL import Image

    files = sorted((tmp_path / "out").glob("sample_*.png"))
    assert len(files) == 2 and "red circle" in result.stdout
    assert Image.open(files[0]).size == (16, 16)


def test_export_loads_in_diffusers_and_reproduces_the_trainer(finished_run: Path, tmp_path: Path) -> None:
    prx_run("export", str(finished_run), "exported", "--weights", "trained", cwd=tmp_path)
    from diffusers import PRXTransformer2DModel

    from prx_core.context import ForwardContext
    from prx_core.keys import Stash
    from prx_core.recipe import load
    from prx_core.testing.fixtures import make_trainer

    exported = PRXTransformer2DModel.from_pretrained(tmp_path / "exported" / "transformer")
    trainer = make_trainer(load(finished_run / "recipe.toml"), finished_run, resume="auto")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.rand(2, generator=gen)
    text, mask = trainer.run.text_encoder.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        ours = trainer.forward_module(x, t, text, mask, ForwardContext(stash=Stash(), generator=None, training=False))
        theirs = exported(x, t, text, attention_mask=mask).sample
    assert torch.equal(ours, theirs)


def test_commands_explain_a_missing_run(tmp_path: Path) -> None:
    result = prx_run("sample", str(tmp_path / "nope"), "--prompt", "x", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "is not a run directory" in result.stderr
