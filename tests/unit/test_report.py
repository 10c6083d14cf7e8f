"""`prx-run report` on hand-written run directories: grouping, mean ± std, deltas, best values,
throughput, the published column, CSV and plots. Every expected number is computed by hand."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from prx_core.commands import report
from prx_core.published import PUBLISHED, baseline_of, lookup


def write_run(
    directory: Path,
    name: str,
    seed: int,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    reference: str = "",
    extra_lines: list[str] | None = None,
) -> Path:
    """A run directory as prx-run leaves it, reduced to what the report reads."""
    directory.mkdir(parents=True)
    header = f'name = "{name}"\nseed = {seed}\n' + (f'reference = "{reference}"\n' if reference else "")
    (directory / "recipe.toml").write_text(header + "\n[train]\nsteps = 20\n", encoding="utf-8")
    (directory / "checkpoints").mkdir()  # not a run of its own: never searched
    lines = [json.dumps(line) for line in [*train, *evals]] + (extra_lines or [])
    (directory / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    return directory


def train_lines(losses: list[float], batches_per_s: list[float], batch: int = 8) -> list[dict[str, Any]]:
    return [
        {"step": 10 * (i + 1), "time": 0.0, "loss": loss, "batches_per_s": bps, "images_per_s": bps * batch}
        for i, (loss, bps) in enumerate(zip(losses, batches_per_s, strict=True))
    ]


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """Two recipes × two seeds, plus a one-seed recipe, with metric values chosen for easy sums."""
    root = tmp_path / "runs"
    # baseline: final fid 20 and 22 (mean 21, std √2); adherence 0.5 and 0.7 (mean 0.6, std √0.02)
    write_run(
        root / "baseline" / "seed0",
        "baseline",
        0,
        train_lines([1.0, 0.5], [2.0, 4.0]),
        [
            {"step": 10, "eval/loss": 0.40, "eval/fid": 30.0, "eval/shapes_adherence": 0.6},
            {"step": 20, "eval/loss": 0.30, "eval/fid": 20.0, "eval/shapes_adherence": 0.5},
        ],
        reference="latent_256/baseline",
    )
    write_run(
        root / "baseline" / "seed1",
        "baseline",
        1,
        train_lines([1.0, 0.7], [3.0, 5.0]),
        [
            {"step": 10, "eval/loss": 0.50, "eval/fid": 21.0, "eval/shapes_adherence": 0.4},
            {"step": 20, "eval/loss": 0.34, "eval/fid": 22.0, "eval/shapes_adherence": 0.7},
        ],
        reference="latent_256/baseline",
    )
    # tread: final fid 10 and 14 (mean 12, std 2√2), three throughput windows (median = middle one)
    write_run(
        root / "tread" / "seed0",
        "tread",
        0,
        train_lines([0.9, 0.6, 0.4], [1.0, 9.0, 6.0]),
        [{"step": 20, "eval/loss": 0.20, "eval/fid": 10.0, "eval/shapes_adherence": 0.9}],
        reference="latent_256/tread",
        extra_lines=['{"step": 30, "loss": 0.1'],  # a line cut short by a crash: skipped
    )
    write_run(
        root / "tread" / "seed1",
        "tread",
        1,
        train_lines([0.9, 0.5, 0.3], [2.0, 8.0, 7.0]),
        [{"step": 20, "eval/loss": 0.24, "eval/fid": 14.0, "eval/shapes_adherence": 0.8}],
        reference="latent_256/tread",
    )
    write_run(
        root / "ema" / "seed0",
        "ema",
        0,
        train_lines([0.8], [3.0]),
        [{"step": 20, "eval/loss": 0.25, "eval/fid": 15.0, "eval/shapes_adherence/colour": 0.75}],
    )
    return root


def groups_of(root: Path, baseline: str | None = None) -> tuple[dict[str, report.Group], report.Group | None]:
    runs = [report.read_run(p) for p in report.find_runs([root])]
    groups = report.group_runs(runs)
    return {g.name: g for g in groups}, report.pick_baseline(groups, baseline)


def test_runs_are_found_and_grouped_by_recipe_name_over_seeds(study: Path) -> None:
    found = report.find_runs([study])
    assert len(found) == 5 and all(p.name.startswith("seed") for p in found)
    groups, baseline = groups_of(study)
    assert sorted(groups) == ["baseline", "ema", "tread"]
    assert groups["tread"].seeds == [0, 1] and groups["ema"].seeds == [0]
    assert baseline is groups["baseline"]


def test_final_metrics_are_mean_and_sample_std_over_seeds(study: Path) -> None:
    groups, _ = groups_of(study)
    fid = groups["baseline"].final("eval/fid")
    assert fid.mean == pytest.approx(21.0) and fid.std == pytest.approx(math.sqrt(2.0)) and fid.n == 2
    tread = groups["tread"].final("eval/fid")
    assert tread.mean == pytest.approx(12.0) and tread.std == pytest.approx(2 * math.sqrt(2.0))
    adherence = groups["baseline"].final("eval/shapes_adherence")
    assert adherence.mean == pytest.approx(0.6) and adherence.std == pytest.approx(math.sqrt(0.02))
    one = groups["ema"].final("eval/fid")
    assert one.mean == pytest.approx(15.0) and one.std is None and one.n == 1
    assert groups["ema"].final("eval/shapes_adherence").n == 0  # this run never reported it


def test_deltas_are_differences_of_means_from_the_baseline(study: Path) -> None:
    groups, baseline = groups_of(study)
    assert baseline is not None
    assert report.delta(groups["tread"].final("eval/fid"), baseline.final("eval/fid")) == pytest.approx(12.0 - 21.0)
    assert report.delta(groups["tread"].final("eval/loss"), baseline.final("eval/loss")) == pytest.approx(0.22 - 0.32)
    assert report.delta(groups["ema"].final("eval/shapes_adherence"), baseline.final("eval/shapes_adherence")) is None


def test_best_value_follows_each_metrics_direction(study: Path) -> None:
    groups, _ = groups_of(study)
    # fid: lower is better; seed 0 best 20 (of 30, 20), seed 1 best 21 (of 21, 22)
    assert groups["baseline"].best("eval/fid").mean == pytest.approx(20.5)
    # shapes adherence: higher is better; seed 0 best 0.6, seed 1 best 0.7
    assert groups["baseline"].best("eval/shapes_adherence").mean == pytest.approx(0.65)
    assert report.higher_is_better("eval/shapes_adherence/colour") and not report.higher_is_better("eval/loss")


def test_throughput_is_the_median_window_then_averaged_over_seeds(study: Path) -> None:
    groups, _ = groups_of(study)
    # medians: seed 0 of (1, 9, 6) = 6, seed 1 of (2, 8, 7) = 7
    bps = groups["tread"].throughput("batches_per_s")
    assert bps.mean == pytest.approx(6.5) and bps.std == pytest.approx(math.sqrt(0.5))
    # two windows: the median is their mean; images/s = 8 × batches/s here
    assert groups["baseline"].throughput("images_per_s").mean == pytest.approx(8 * (3.0 + 4.0) / 2)
    assert groups["tread"].final_loss().mean == pytest.approx(0.35)  # last logged losses 0.4 and 0.3


def test_published_rows_come_from_the_recipes_reference(study: Path) -> None:
    groups, _ = groups_of(study)
    assert groups["tread"].published() == lookup("latent_256/tread")
    assert groups["ema"].published() is None
    cell = report.published_cell(lookup("latent_256/tread"))
    # TREAD 21.61 / 0.55 / 0.41 against the published baseline 18.20 / 0.41 / 0.39
    assert cell == "21.61 / 0.55 / 0.41 (Δ +3.41 / +0.14 / +0.02)"
    assert "published baseline" in report.published_cell(lookup("latent_256/baseline"))
    assert baseline_of("pixel_1024/sprint") is PUBLISHED["pixel_1024/baseline"]
    with pytest.raises(KeyError, match="did you mean 'latent_256/tread'"):
        lookup("latent_256/treed")


def test_published_numbers_match_spec_section_5() -> None:
    assert (lookup("latent_256/repa_e_vae").fid, lookup("latent_256/repa_e_vae").cmmd) == (12.08, 0.26)
    assert lookup("latent_256/muon").batches_per_s is None
    assert lookup("pixel_1024/tread").metrics() == {"fid": 14.10, "cmmd": 0.46, "dino_mmd": 0.37}
    assert len(PUBLISHED) == 15


def test_baseline_choice(study: Path) -> None:
    groups, baseline = groups_of(study, "tread")
    assert baseline is groups["tread"]
    with pytest.raises(ValueError, match="not among"):
        groups_of(study, "nope")
    renamed = [report.Group("mini-baseline", []), report.Group("mini-ema", [])]
    assert report.pick_baseline(renamed, None) is renamed[0]
    assert report.pick_baseline([report.Group("a", []), report.Group("b", [])], None) is None


def test_markdown_and_csv(study: Path, tmp_path: Path) -> None:
    text, files = report.build([study], tmp_path / "out")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| recipe | seeds"))
    assert "| fid | Δ |" in header and "| loss | Δ |" in header and "shapes_adherence" in header
    tread_row = next(line for line in lines if line.startswith("| tread | 0 1 |"))
    assert "| 12 ± 2.8 | -9 |" in tread_row
    assert "21.61 / 0.55 / 0.41" in tread_row
    assert lines.index(next(x for x in lines if x.startswith("| baseline |"))) < lines.index(tread_row)
    assert "| eval/shapes_adherence/colour | – | 0.75 | – |" in text  # every key, in full

    with (tmp_path / "out" / "summary.csv").open() as fh:
        rows = {row["recipe"]: row for row in csv.DictReader(fh)}
    assert float(rows["tread"]["eval/fid:final_mean"]) == pytest.approx(12.0)
    assert float(rows["tread"]["eval/fid:final_std"]) == pytest.approx(2 * math.sqrt(2.0))
    assert float(rows["tread"]["eval/fid:final_delta"]) == pytest.approx(-9.0)
    assert float(rows["tread"]["published_fid"]) == pytest.approx(21.61)
    assert rows["ema"]["eval/fid:final_std"] == "" and rows["ema"]["published_fid"] == ""
    with (tmp_path / "out" / "runs.csv").open() as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 5 and {r["seed"] for r in runs if r["recipe"] == "tread"} == {"0", "1"}
    assert (tmp_path / "out" / "report.md").read_text() == text
    names = {f.name for f in files}
    assert {"report.md", "summary.csv", "runs.csv"} <= names


def test_plots_are_written(study: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, files = report.build([study], tmp_path / "out")
    names = {f.name for f in files}
    assert {"loss.png", "eval_fid.png", "eval_loss.png", "eval_shapes_adherence.png", "final.png"} <= names
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")


def test_staged_run_reads_as_one_run(tmp_path: Path) -> None:
    run = tmp_path / "speedrun"
    write_run(run / "stages" / "1-512px", "speedrun", 42, train_lines([1.0], [4.0]), [{"step": 10, "eval/fid": 9.0}])
    second = run / "stages" / "2-1024px"
    write_run(
        second, "speedrun", 42, [{"step": 20, "loss": 0.5, "batches_per_s": 2.0}], [{"step": 20, "eval/fid": 7.0}]
    )
    stages = [
        {"index": 0, "name": "512px", "dir": "stages/1-512px"},
        {"index": 1, "name": "1024px", "dir": "stages/2-1024px"},
    ]
    (run / "stages.json").write_text(json.dumps({"recipe": "speedrun", "stages": stages}))
    assert report.find_runs([tmp_path]) == [run.resolve()]
    record = report.read_run(run)
    assert [line["step"] for line in record.train] == [10, 20] and record.final("eval/fid") == 7.0
    assert record.best("eval/fid") == 7.0 and record.last_step == 20


def test_main_reports_missing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path)]) == 1
    assert "no run directories" in capsys.readouterr().err


def test_main_prints_the_table_and_defaults_out_under_the_root(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(study), "--baseline", "baseline"]) == 0
    out = capsys.readouterr().out
    assert "# Ablation report" in out and (study / "report" / "report.md").is_file()
    # the report folder is not mistaken for a run on the next call
    assert len(report.find_runs([study])) == 5
