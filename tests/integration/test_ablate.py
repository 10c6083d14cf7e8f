"""`prx-run ablate`: launch commands, refusal of bad studies before anything runs, and a real tiny
2-recipe × 2-seed ablation (skipped when finished, resumed when partial, reported end to end)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from prx_core.commands import ablate, report
from prx_core.recipe import load
from prx_core.testing.fixtures import make_trainer, write_recipe

pytestmark = pytest.mark.integration

#: The tiny recipe evaluates only the validation loss: cheap, and enough for the report.
TINY_EVAL = {"eval": {"at_end": True, "num_samples": 2, "batch": 2, "steps": 1, "t_bins": 2}}


def two_recipes(directory: Path) -> list[Path]:
    a = write_recipe(directory, {"name": "tiny-a", **TINY_EVAL}, name="a.toml")
    b = write_recipe(directory, {"name": "tiny-b", "plugins": {"contrastive_fm": {}}, **TINY_EVAL}, name="b.toml")
    return [a, b]


def run_ablate(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``prx-run ablate`` in this process (its runs are subprocesses); (exit code, stdout)."""
    code = ablate.main(list(args))
    return code, capfd.readouterr().out


def test_print_gives_one_launch_command_per_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = two_recipes(tmp_path)
    argv = [str(a), str(b), "--seeds", "0", "1", "--runs-root", str(tmp_path / "runs"), "--set", "train.steps=2"]
    assert ablate.main([*argv, "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    expected = [("tiny-a", 0), ("tiny-a", 1), ("tiny-b", 0), ("tiny-b", 1)]
    for line, (name, seed) in zip(lines, expected, strict=True):
        words = shlex.split(line)
        assert words[0] == "prx-run"
        assert words[words.index("--run-dir") + 1] == str(tmp_path / "runs" / name / f"seed{seed}")
        assert words[words.index("--resume") + 1] == "auto"
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert sets == ["train.steps=2", f"seed={seed}"]

    assert ablate.main([*argv, "--print", "--nproc", "4"]) == 0
    first = shlex.split(capsys.readouterr().out.splitlines()[0])
    assert first[:6] == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "prx_core.cli"]


def test_default_seed_is_the_recipes_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_recipe(tmp_path, {"name": "tiny-a", "seed": 7}, name="a.toml")
    assert ablate.main([str(a), "--runs-root", str(tmp_path / "runs"), "--print"]) == 0
    line = capsys.readouterr().out.strip()
    assert "seed7" in line and "seed=7" in line


def test_bad_studies_are_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_recipe(tmp_path, {"name": "same"}, name="a.toml")
    b = write_recipe(tmp_path, {"name": "same", "plugins": {"contrastive_fm": {}}}, name="b.toml")
    runs = tmp_path / "runs"
    assert ablate.main([str(a), str(b), "--runs-root", str(runs)]) == 2
    assert "both have name 'same'" in capsys.readouterr().err
    bad = write_recipe(tmp_path, {"name": "bad", "train": {"stepz": 3}}, name="bad.toml")
    assert ablate.main([str(a), str(bad), "--runs-root", str(runs)]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert ablate.main([str(a), "--set", "seed=3", "--runs-root", str(runs)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert ablate.main([str(a), "--seeds", "-1", "--runs-root", str(runs)]) == 2
    assert not runs.exists()


@pytest.mark.slow
def test_tiny_ablation_runs_every_seed_then_skips_finished_runs_and_reports(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, b = two_recipes(tmp_path)
    args = [str(a), str(b), "--seeds", "0", "1", "--runs-root", "runs", "--set", "train.steps=2", "-q"]
    code, out = run_ablate(capfd, *args)
    assert code == 0, out[-3000:]
    assert "4 run(s): 0 failed, 0 incomplete" in out
    for name in ("tiny-a", "tiny-b"):
        for seed in (0, 1):
            run = tmp_path / "runs" / name / f"seed{seed}"
            assert (run / "final" / "transformer").is_dir() and (run / "checkpoints" / "step_00000002").is_dir()
            info = json.loads((run / "run.json").read_text())
            assert info["overrides"] == ["train.steps=2", f"seed={seed}"]
            assert f"seed = {seed}" in (run / "recipe.toml").read_text()
    # different seeds really are different runs (initialisation, data, noise)
    lines = [(tmp_path / "runs" / "tiny-a" / f"seed{s}" / "metrics.jsonl").read_text().splitlines() for s in (0, 1)]
    losses = [[json.loads(x)["loss"] for x in seed_lines if '"loss"' in x] for seed_lines in lines]
    assert losses[0] != losses[1]

    code, out = run_ablate(capfd, *args)
    assert code == 0 and out.count("finished earlier, skipped") == 4

    text, _ = report.build([tmp_path / "runs"], tmp_path / "report")
    assert "| tiny-a | 0 1 | 2 |" in text and "| tiny-b | 0 1 | 2 |" in text
    groups = {g.name: g for g in report.group_runs([report.read_run(p) for p in report.find_runs([tmp_path / "runs"])])}
    assert groups["tiny-a"].final("eval/loss").n == 2 and groups["tiny-b"].final("eval/loss").std is not None
    assert (tmp_path / "report" / "summary.csv").is_file()


@pytest.mark.slow
def test_failed_run_does_not_stop_the_others_and_partial_runs_resume(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    good = write_recipe(tmp_path, {"name": "good", **TINY_EVAL}, name="good.toml")
    # valid as a recipe, fails when the run starts (on any machine)
    broken = write_recipe(
        tmp_path, {"name": "broken", "text_encoder": {"path": str(tmp_path / "missing")}}, name="x.toml"
    )
    # a partial run: two steps trained (in this process, to save a start-up), then three asked for
    run = tmp_path / "runs" / "good" / "seed0"
    make_trainer(load(good, ["train.steps=2", "seed=0"]), run).fit()
    capfd.readouterr()

    code, out = run_ablate(capfd, str(broken), str(good), "--runs-root", "runs", "--set", "train.steps=3", "-q")
    assert code == 1
    assert "broken/seed0  FAILED (exit 1" in out and "good/seed0: resuming" in out
    assert "2 run(s): 1 failed, 0 incomplete" in out
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    # training lines 1..3 once each; the evaluations that ended the 2-step and the 3-step run
    assert steps == [1, 2, 2, 3, 3]
    assert (run / "checkpoints" / "step_00000003" / "COMMIT").is_file()
