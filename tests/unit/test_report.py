"""`prx-run report` on hand-written run directories: grouping, mean ± std, deltas, best values,
throughput, the published column, CSV and plots; the paired / Welch confidence intervals on Δ and
the Student-t quantile behind them. Every expected number is computed by hand (the arithmetic is
written out), and checked against scipy.stats where scipy is installed."""

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
    """A run directory as prx-run leaves it (``prx-run ablate --seeds``'s run of ``seed``), reduced to
    what the report reads plus run.json."""
    directory.mkdir(parents=True)
    comment = f"# Resolved recipe of run '{name}', written by prx 0.1.0.\n# Overrides: seed={seed}\n"
    header = f'name = "{name}"\nseed = {seed}\n' + (f'reference = "{reference}"\n' if reference else "")
    (directory / "recipe.toml").write_text(comment + header + "\n[train]\nsteps = 20\n", encoding="utf-8")
    info = {"name": name, "source": None, "overrides": [f"seed={seed}"], "command": ["prx-run"], "plugins": {}}
    (directory / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
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
    assert {"report.md", "summary.csv", "runs.csv", "comparisons.csv"} <= names


def test_plots_are_written(study: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, files = report.build([study], tmp_path / "out")
    names = {f.name for f in files}
    assert {"loss.png", "eval_fid.png", "eval_loss.png", "eval_shapes_adherence.png", "final.png"} <= names
    assert "delta.png" in names  # Δ with its interval as error bars
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


# --------------------------------------------------------------------------- the Student-t quantile


def test_t_quantile_matches_printed_table_values() -> None:
    # two-sided 95 % critical values as printed in every t table (4 decimals)
    assert report.student_t_quantile(0.975, 1) == pytest.approx(12.7062, abs=5e-5)
    assert report.student_t_quantile(0.975, 2) == pytest.approx(4.3027, abs=5e-5)
    assert report.student_t_quantile(0.975, 4) == pytest.approx(2.7764, abs=5e-5)
    assert report.student_t_quantile(0.95, 10) == pytest.approx(1.8125, abs=5e-5)
    assert report.student_t_quantile(0.995, 30) == pytest.approx(2.7500, abs=5e-5)


@pytest.mark.parametrize("p", [0.6, 0.8, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.3, 0.025, 1e-6])
def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(p: float) -> None:
    # 1 df is the Cauchy distribution: F(t) = 1/2 + atan(t)/π, so t = tan(π (p − 1/2));
    # 2 df: F(t) = 1/2 + t / (2 √(2 + t²)), so t = (2p − 1) / √(2 p (1 − p)).
    assert report.student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
    assert report.student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_t_quantile_symmetry_centre_and_bad_inputs() -> None:
    assert report.student_t_quantile(0.5, 3) == 0.0
    assert report.student_t_quantile(0.1, 5.5) == pytest.approx(-report.student_t_quantile(0.9, 5.5), rel=1e-12)
    assert report.student_t_upper_tail(0.0, 7) == 0.5
    with pytest.raises(ValueError, match="0 < p < 1"):
        report.student_t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        report.student_t_quantile(0.9, 0)


def test_t_quantile_and_incomplete_beta_match_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    scipy_special = pytest.importorskip("scipy.special")
    # real-valued df too: a Welch interval's Welch–Satterthwaite df is rarely an integer
    for df in (1, 1.3, 2, 2.7, 3, 4, 5.5, 9, 30, 200):
        for p in (0.6, 0.9, 0.95, 0.975, 0.99, 0.995, 0.9995, 0.05, 0.001):
            assert report.student_t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9), (p, df)
        for t in (0.1, 1.0, 3.0, 40.0):
            assert report.student_t_upper_tail(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-9)
    for a, b in ((0.5, 0.5), (2.0, 3.0), (40.0, 0.5), (0.5, 40.0), (300.0, 250.0)):
        for x in (1e-6, 0.05, 0.3, 0.5, 0.55, 0.9, 0.999):
            assert report.regularized_incomplete_beta(x, a, b) == pytest.approx(
                float(scipy_special.betainc(a, b, x)), rel=1e-10, abs=1e-300
            ), (x, a, b)


# --------------------------------------------------------------------------- paired and Welch intervals

#: Three seeds whose baseline values spread widely (seed noise) while the ablation is the baseline
#: plus 0.10 ± 0.01 on every seed: per-seed differences 0.09, 0.10, 0.11.
BASELINE_3 = [0.30, 0.55, 0.70]
OFFSET_3 = [0.39, 0.65, 0.81]


def test_paired_interval_three_seeds_by_hand() -> None:
    differences = [a - b for a, b in zip(OFFSET_3, BASELINE_3, strict=True)]  # 0.09, 0.10, 0.11
    interval = report.paired_interval(differences, 0.95)
    # mean d̄ = (0.09 + 0.10 + 0.11) / 3 = 0.10
    # s_d = √(((−0.01)² + 0² + 0.01²) / (3 − 1)) = √(0.0001) = 0.01; SE = 0.01 / √3 = 0.0057735
    # t_{0.975, 2} = 4.3027 (table) → half-width 4.3027 × 0.0057735 = 0.024841
    assert interval.delta == pytest.approx(0.10, abs=1e-12)
    assert interval.df == 2 and interval.t == pytest.approx(4.3027, abs=5e-5)
    assert interval.low == pytest.approx(0.10 - 0.024841, abs=2e-6)
    assert interval.high == pytest.approx(0.10 + 0.024841, abs=2e-6)
    assert interval.excludes_zero and interval.note == ""


def test_paired_interval_matches_scipy_ttest_rel_and_t_interval() -> None:
    stats = pytest.importorskip("scipy.stats")
    ablation = [0.41, 0.52, 0.66, 0.35, 0.58]
    baseline = [0.40, 0.47, 0.60, 0.36, 0.50]
    interval = report.paired_interval([a - b for a, b in zip(ablation, baseline, strict=True)], 0.9)
    expected = stats.ttest_rel(ablation, baseline).confidence_interval(0.9)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), rel=1e-9)
    d = [a - b for a, b in zip(ablation, baseline, strict=True)]
    low, high = stats.t.interval(0.9, len(d) - 1, loc=sum(d) / len(d), scale=stats.sem(d))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-9)


def test_pairing_cancels_the_seed_noise_an_unpaired_interval_keeps() -> None:
    # Same six numbers, unpaired: the baseline's own spread (std 0.20) swamps the 0.10 offset.
    # Welch: s_a² = 0.044933, s_b² = 0.040833, SE = √((0.044933 + 0.040833) / 3) = 0.16908,
    # df = SE⁴ / ((0.044933/3)²/2 + (0.040833/3)²/2) = 3.99, half-width ≈ 2.78 × 0.169 = 0.47.
    unpaired = report.welch_interval(OFFSET_3, BASELINE_3, 0.95)
    assert unpaired.delta == pytest.approx(0.10, abs=1e-12)
    assert unpaired.df == pytest.approx(3.991, abs=1e-3)
    assert unpaired.low is not None and unpaired.high is not None
    assert unpaired.low < 0 and unpaired.high > 0.10 + 0.46
    assert not unpaired.excludes_zero
    paired = report.paired_interval([a - b for a, b in zip(OFFSET_3, BASELINE_3, strict=True)], 0.95)
    assert paired.excludes_zero


def test_welch_interval_by_hand_and_against_scipy() -> None:
    # a = 1, 2, 3 (mean 2, s² 1); b = 5, 6, 7 (mean 6, s² 1): Δ = −4, SE² = 1/3 + 1/3 = 2/3,
    # df = (2/3)² / ((1/3)²/2 + (1/3)²/2) = (4/9) / (1/9) = 4, t_{0.975, 4} = 2.7764 (table),
    # half-width 2.7764 × √(2/3) = 2.7764 × 0.81650 = 2.26693.
    interval = report.welch_interval([1.0, 2.0, 3.0], [5.0, 6.0, 7.0], 0.95)
    assert interval.delta == pytest.approx(-4.0) and interval.df == pytest.approx(4.0)
    assert interval.low == pytest.approx(-4.0 - 2.26693, abs=1e-4)
    assert interval.high == pytest.approx(-4.0 + 2.26693, abs=1e-4)
    assert interval.excludes_zero
    # unequal sizes: a = 1, 2, 3 (s² 1, n 3), b = 4, 6 (s² 2, n 2): SE² = 1/3 + 2/2 = 4/3,
    # df = (4/3)² / ((1/3)²/2 + 1²/1) = (16/9) / (19/18) = 32/19
    uneven = report.welch_interval([1.0, 2.0, 3.0], [4.0, 6.0], 0.95)
    assert uneven.delta == pytest.approx(-3.0) and uneven.df == pytest.approx(32 / 19)
    stats = pytest.importorskip("scipy.stats")
    for a, b, confidence in (([1.0, 2.0, 3.0], [4.0, 6.0], 0.95), ([0.3, 0.5, 0.4, 0.9], [0.2, 0.25, 0.3], 0.8)):
        got = report.welch_interval(a, b, confidence)
        result = stats.ttest_ind(a, b, equal_var=False)
        expected = result.confidence_interval(confidence)
        assert got.df == pytest.approx(result.df, rel=1e-12)
        assert (got.low, got.high) == pytest.approx((expected.low, expected.high), rel=1e-9)


def test_one_seed_gives_no_interval_and_two_seeds_a_wide_one() -> None:
    single = report.paired_interval([0.3], 0.95)
    assert single.delta == 0.3 and single.low is None and single.high is None and not single.excludes_zero
    assert "n = 1" in single.note and "no interval" in single.note
    # d = 0.1, 0.3: d̄ = 0.2, s_d = √((0.1² + 0.1²) / 1) = 0.141421, SE = 0.141421 / √2 = 0.1,
    # t_{0.975, 1} = 12.7062 → half-width 1.27062: the interval [−1.0706, 1.4706] holds 0
    pair = report.paired_interval([0.1, 0.3], 0.95)
    assert pair.df == 1 and pair.low == pytest.approx(0.2 - 1.27062, abs=1e-4)
    assert pair.high == pytest.approx(0.2 + 1.27062, abs=1e-4) and not pair.excludes_zero
    assert "n = 2" in pair.note and "12.71" in pair.note and "wide" in pair.note
    # Welch with one run on a side: no variance there, no interval
    lonely = report.welch_interval([0.5], [0.4, 0.6], 0.95)
    assert lonely.delta == pytest.approx(0.0, abs=1e-12) and lonely.low is None and "n = 1" in lonely.note
    # Welch with two runs a side: a = 0, 2 (s² 2), b = 1, 5 (s² 8): SE² = 1 + 4 = 5, df = 25 / (1 + 16)
    two = report.welch_interval([0.0, 2.0], [1.0, 5.0], 0.95)
    assert two.df == pytest.approx(25 / 17) and "n = 2" in two.note
    with pytest.raises(ValueError, match="confidence"):
        report.paired_interval([0.1, 0.2], 95)


def test_identical_differences_give_a_zero_width_interval() -> None:
    same = report.paired_interval([0.25, 0.25, 0.25], 0.95)
    assert same.low == same.high == 0.25 and same.excludes_zero and "zero width" in same.note
    unchanged = report.paired_interval([0.0, 0.0], 0.95)
    assert not unchanged.excludes_zero  # an interval [0, 0] holds 0


# --------------------------------------------------------------------------- the paired report


@pytest.fixture
def noisy_study(tmp_path: Path) -> Path:
    """Three seeds with large seed noise in the baseline. `offset` is the baseline + 0.10 on every
    seed (± 0.01) in shapes_adherence; `jitter` only moves each seed by −0.05..+0.04 around it."""
    root = tmp_path / "runs"
    baseline_loss = [0.080, 0.060, 0.050]
    recipes = {
        "mini-baseline": (BASELINE_3, baseline_loss),
        "mini-offset": (OFFSET_3, [0.082, 0.057, 0.052]),  # loss: + 0.002, − 0.003, + 0.002
        "mini-jitter": ([0.34, 0.50, 0.72], [0.079, 0.062, 0.050]),  # adherence: + 0.04, − 0.05, + 0.02
    }
    for name, (adherence, loss) in recipes.items():
        for seed in (0, 1, 2):
            evals = [
                {"step": 10, "time": 1.0, "eval/loss": 0.2, "eval/shapes_adherence": 0.1},
                {
                    "step": 20,
                    "time": 2.0,
                    "eval/loss/t0.00-0.50": loss[seed] / 2,
                    "eval/loss/t0.50-1.00": 1.5 * loss[seed],
                    "eval/loss": loss[seed],
                    "eval/shapes_adherence": adherence[seed],
                    "eval/shapes_adherence/colour": adherence[seed],
                },
            ]
            write_run(root / name / f"seed{seed}", name, seed, train_lines([0.5, 0.1], [5.0, 6.0]), evals)
    return root


def _row(text: str, recipe: str, metric: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {recipe} | {metric} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_marks_a_real_offset_and_not_seed_noise(noisy_study: Path, tmp_path: Path) -> None:
    text, files = report.build([noisy_study], tmp_path / "out")
    # header of the paired table, and the one line explaining it just above
    lines = text.splitlines()
    header = lines.index("| recipe | metric | Δ | 95 % interval | n | method | df | ✱ | note |")
    assert lines[header - 2].startswith("Δ = recipe − mini-baseline: *paired* rows")
    assert "excludes 0" in lines[header - 2]

    offset = _row(text, "mini-offset", "shapes_adherence")
    # d = 0.09, 0.10, 0.11: Δ +0.1, interval 0.10 ± 0.024841 = [0.0752, 0.125]
    assert offset[2:] == ["+0.1", "[+0.0752, +0.125]", "3", "paired", "2", "✱ better", ""]
    jitter = _row(text, "mini-jitter", "shapes_adherence")
    # d = 0.04, −0.05, 0.02: Δ = 0.01/3 = +0.00333; s_d = 0.047258, SE = 0.027285,
    # half-width 4.3027 × 0.027285 = 0.1174 → [−0.114, +0.121]: holds 0, no mark
    assert jitter[2:] == ["+0.00333", "[-0.114, +0.121]", "3", "paired", "2", "", ""]
    # loss moved by +0.002, −0.003, +0.002: Δ = +0.000333, s_d = 0.0028868, SE = 0.0016667,
    # half-width 4.3027 × 0.0016667 = 0.0071712: noise, no mark
    assert _row(text, "mini-offset", "loss")[2:4] == ["+0.000333", "[-0.00684, +0.0075]"]
    assert _row(text, "mini-offset", "loss")[7] == ""

    # the final-evaluation table carries the mark on its Δ too
    final_row = next(x for x in lines if x.startswith("| mini-offset | 0 1 2 |"))
    assert "| +0.1 ✱ |" in final_row
    assert "✱" not in next(x for x in lines if x.startswith("| mini-jitter | 0 1 2 |"))

    with (tmp_path / "out" / "comparisons.csv").open() as fh:
        rows = {(r["recipe"], r["key"]): r for r in csv.DictReader(fh)}
    assert list(rows[("mini-offset", "eval/shapes_adherence")]) == list(report.COMPARISON_COLUMNS)
    marked = rows[("mini-offset", "eval/shapes_adherence")]
    assert marked["method"] == "paired" and marked["n"] == "3" and marked["seeds"] == "0 1 2"
    assert float(marked["delta"]) == pytest.approx(0.10)
    assert float(marked["ci_low"]) == pytest.approx(0.10 - 0.024841, abs=2e-6)
    assert float(marked["ci_high"]) == pytest.approx(0.10 + 0.024841, abs=2e-6)
    assert marked["excludes_zero"] == "true" and marked["verdict"] == "better" and marked["df"] == "2.0"
    assert rows[("mini-jitter", "eval/shapes_adherence")]["excludes_zero"] == "false"
    # every evaluation key is compared in the CSV, components and t bins included
    assert rows[("mini-offset", "eval/shapes_adherence/colour")]["excludes_zero"] == "true"
    assert ("mini-offset", "eval/loss/t0.50-1.00") in rows and ("mini-baseline", "eval/loss") not in rows
    with (tmp_path / "out" / "summary.csv").open() as fh:
        summary = {r["recipe"]: r for r in csv.DictReader(fh)}
    assert summary["mini-offset"]["eval/shapes_adherence:final_delta_excludes_zero"] == "true"
    assert float(summary["mini-offset"]["eval/shapes_adherence:final_delta_low"]) == pytest.approx(0.075159, 1e-4)
    assert summary["mini-offset"]["eval/shapes_adherence:final_delta_method"] == "paired"
    assert summary["mini-baseline"]["eval/shapes_adherence:final_delta_method"] == ""
    assert "Fewer than 3 seeds" not in text  # three seeds: no small-n caveat


def test_a_worse_result_is_marked_worse(noisy_study: Path, tmp_path: Path) -> None:
    # against mini-offset as the baseline, the real baseline is 0.10 lower in adherence (↑ is better)
    text, _ = report.build([noisy_study], tmp_path / "out", baseline_name="mini-offset")
    assert _row(text, "mini-baseline", "shapes_adherence")[2:4] == ["-0.1", "[-0.125, -0.0752]"]
    assert _row(text, "mini-baseline", "shapes_adherence")[7] == "✱ worse"


def test_seeds_that_differ_fall_back_to_welch_and_say_so(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, value in zip((0, 1, 2), (1.0, 2.0, 3.0), strict=True):
        write_run(root / "base" / f"s{seed}", "baseline", seed, [], [{"step": 5, "eval/fid": value}])
    for seed, value in zip((0, 1, 3), (5.0, 6.0, 7.0), strict=True):
        write_run(root / "other" / f"s{seed}", "other", seed, [], [{"step": 5, "eval/fid": value}])
    text, _ = report.build([root], tmp_path / "out")
    row = _row(text, "other", "fid")
    # the hand-worked Welch example above: Δ = +4, df 4, half-width 2.26693 (fid: lower is better)
    assert row[2:8] == ["+4", "[+1.73, +6.27]", "3 vs 3", "Welch (seeds differ: 0 1 3 vs 0 1 2)", "4", "✱ worse"]
    with (tmp_path / "out" / "comparisons.csv").open() as fh:
        (csv_row,) = list(csv.DictReader(fh))
    assert csv_row["method"] == "Welch" and csv_row["seeds"] == "0 1 3" and csv_row["baseline_seeds"] == "0 1 2"
    assert "seeds differ" in csv_row["note"]


def test_small_n_rows_say_why_their_interval_is_wide_or_missing(study: Path, tmp_path: Path) -> None:
    text, _ = report.build([study], tmp_path / "out")
    # tread (seeds 0 1) against baseline (0 1): fid differences −10, −8 → Δ −9, SE 1, t(1) 12.71
    tread = _row(text, "tread", "fid")
    assert tread[2:8] == ["-9", "[-21.7, +3.71]", "2", "paired", "1", ""]
    assert "n = 2" in tread[8] and "12.71" in tread[8] and "wide" in tread[8]
    # ema ran seed 0 only: Welch against two baseline seeds, and no interval at all
    ema = _row(text, "ema", "fid")
    assert ema[3:6] == ["none", "1 vs 2", "Welch (seeds differ: 0 vs 0 1)"] and "n = 1" in ema[8]
    assert "Fewer than 3 seeds: with n = 2 the t quantile has 1 degree of freedom (12.71 at 95 %" in text


def test_confidence_option(noisy_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out80"
    assert report.main([str(noisy_study), "--out", str(out), "--confidence", "0.8"]) == 0
    text = (out / "report.md").read_text()
    assert "| 80 % interval |" in text
    # t_{0.9, 2} = 1.8856 (table): half-width 1.8856 × 0.0057735 = 0.010887 → [0.0891, 0.111]
    assert _row(text, "mini-offset", "shapes_adherence")[3] == "[+0.0891, +0.111]"
    with open(out / "comparisons.csv") as fh:
        assert {r["confidence"] for r in csv.DictReader(fh)} == {"0.8"}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        report.main([str(noisy_study), "--confidence", "95"])
    assert "strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="confidence"):
        report.build([noisy_study], tmp_path / "bad", confidence=1.0)


def test_the_study_pages_illustrative_table_is_this_fixtures_report(noisy_study: Path, tmp_path: Path) -> None:
    text, _ = report.build([noisy_study], tmp_path / "out")
    page = (Path(__file__).resolve().parents[2] / "docs" / "study.md").read_text(encoding="utf-8")
    table = [x for x in text.splitlines() if x.startswith(("| mini-offset | ", "| mini-jitter | ")) and "paired" in x]
    assert len(table) == 4
    for line in ["| recipe | metric | Δ | 95 % interval | n | method | df | ✱ | note |", *table]:
        assert line in page, line


def test_a_seed_run_twice_in_a_group_is_not_paired(tmp_path: Path) -> None:
    # the same baseline seed in two run roots (e.g. a rerun): pairing would be ambiguous
    for root, value in (("a", 1.0), ("b", 3.0)):
        write_run(tmp_path / root / "baseline", "baseline", 0, [], [{"step": 5, "eval/loss": value}])
    for seed, value in ((0, 2.0), (1, 2.5)):
        write_run(tmp_path / "a" / f"x{seed}", "x", seed, [], [{"step": 5, "eval/loss": value}])
    groups, baseline = groups_of(tmp_path)
    assert baseline is not None
    comparison = report.compare(groups["x"], baseline, "eval/loss")
    assert comparison is not None and comparison.method == "Welch"
    assert comparison.reason == "a seed appears twice in a group"
    # Δ = mean(2, 2.5) − mean(1, 3) = 2.25 − 2 = 0.25
    assert comparison.interval.delta == pytest.approx(0.25)
