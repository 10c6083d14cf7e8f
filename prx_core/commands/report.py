"""``prx-run report``: compare runs, grouped by recipe over seeds.

    prx-run report RUN_DIR_OR_ROOT... [--out DIR] [--baseline NAME]

Each argument is a run directory or a folder searched for run directories (``prx-run ablate``'s
runs root, for instance). Runs are grouped by recipe ``name``; every number is the mean ± sample
standard deviation (n − 1 in the denominator) over the group's seeds. Written to ``--out``:

* ``report.md``: the final evaluation (headline metrics with their difference from the baseline
  group), training throughput, the published reference.md §5 numbers of the row the recipe names with
  ``reference``, the best value of every metric over the run, and every evaluation key in full;
* ``summary.csv`` (one row per recipe) and ``runs.csv`` (one row per run);
* ``loss.png`` (training loss), ``eval_<metric>.png`` (each headline metric against steps) and
  ``final.png`` (final headline metrics as bars with their std), when matplotlib is installed.

What is read: ``metrics.jsonl``. Lines with ``eval/...`` keys are evaluations; "final" is the
evaluation at the highest step, "best" the lowest value over all evaluations (the highest for
metrics where higher is better, such as ``shapes_adherence``). Throughput is the median over the
logged windows of ``images_per_s`` and ``batches_per_s``, since a window that contains an
evaluation or a checkpoint is slower than training. A staged run (``stages.json``) is read as one
run, its stages' metrics in order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prx_core.published import METRICS as PUBLISHED_METRICS
from prx_core.published import PublishedResult, baseline_of, lookup

#: Metric names (the part after ``eval/``) for which a larger value is better.
HIGHER_IS_BETTER = ("shapes_adherence",)
#: Folders never searched for runs.
SKIP_DIRS = {"checkpoints", "samples", "final", "aim", "eval", "report", "__pycache__"}
THROUGHPUT_KEYS = ("images_per_s", "batches_per_s")


def higher_is_better(key: str) -> bool:
    """``eval/shapes_adherence`` and its components (``eval/shapes_adherence/colour``)."""
    name = key.removeprefix("eval/").split("/")[0]
    return name in HIGHER_IS_BETTER


def is_headline(key: str) -> bool:
    """A metric's summary value (``eval/fid``, ``eval/loss``), not a component or a t bin."""
    return key.startswith("eval/") and key.count("/") == 1


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    path: Path
    name: str
    seed: int
    reference: str
    #: Training lines of metrics.jsonl (they carry ``loss``), in step order.
    train: list[dict[str, Any]] = field(default_factory=list)
    #: Evaluation lines (they carry ``eval/...`` keys), in step order.
    evals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        steps = [int(line["step"]) for line in (*self.train, *self.evals)]
        return max(steps, default=0)

    def eval_keys(self) -> list[str]:
        return sorted({k for line in self.evals for k in line if k.startswith("eval/")})

    def final(self, key: str) -> float | None:
        """The value at the last evaluation that reports ``key``."""
        for line in reversed(self.evals):
            if key in line:
                return float(line[key])
        return None

    def best(self, key: str) -> float | None:
        values = [float(line[key]) for line in self.evals if key in line]
        if not values:
            return None
        return max(values) if higher_is_better(key) else min(values)

    def throughput(self, key: str) -> float | None:
        values = [float(line[key]) for line in self.train if key in line]
        return statistics.median(values) if values else None

    def final_loss(self) -> float | None:
        return float(self.train[-1]["loss"]) if self.train else None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training lines, evaluation lines) of one metrics.jsonl; a line cut short by a crash is skipped."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not path.is_file():
        return train, evals
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if not isinstance(line, dict) or "step" not in line:
            continue
        if any(k.startswith("eval/") for k in line):
            evals.append(line)
        elif "loss" in line:
            train.append(line)
    train.sort(key=lambda x: x["step"])
    evals.sort(key=lambda x: x["step"])
    return train, evals


def _recipe_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


def read_run(run_dir: Path) -> RunRecord:
    """One run directory (or a staged run's parent directory)."""
    stages_file = run_dir / "stages.json"
    if stages_file.is_file():
        index = json.loads(stages_file.read_text(encoding="utf-8"))
        parts = [run_dir / entry["dir"] for entry in sorted(index["stages"], key=lambda e: e["index"])]
        parts = [p for p in parts if (p / "recipe.toml").is_file()]
        if not parts:
            raise ValueError(f"{run_dir}: stages.json lists no stage with a recipe.toml yet")
    else:
        parts = [run_dir]
    recipe = _recipe_header(parts[0] / "recipe.toml")
    record = RunRecord(
        path=run_dir,
        name=str(recipe.get("name", run_dir.name)),
        seed=int(recipe.get("seed", 0)),
        reference=str(recipe.get("reference", "")),
    )
    for part in parts:
        train, evals = read_metrics(part / "metrics.jsonl")
        record.train += train
        record.evals += evals
    return record


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories at or below ``paths``, each once, in path order."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
        for root, dirs, files in os.walk(path):
            here = Path(root)
            if "stages.json" in files or "recipe.toml" in files:
                found.append(here)
                dirs[:] = []  # a staged run's stages and a run's sub-folders are not runs of their own
                continue
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return sorted(unique)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of the values present (std is None below 2 values)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: list[float | None]) -> Stat:
        present = [v for v in values if v is not None and math.isfinite(v)]
        if not present:
            return cls(None, None, 0)
        std = statistics.stdev(present) if len(present) > 1 else None
        return cls(statistics.fmean(present), std, len(present))


@dataclass
class Group:
    name: str
    runs: list[RunRecord]

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    @property
    def reference(self) -> str:
        refs = {r.reference for r in self.runs if r.reference}
        return refs.pop() if len(refs) == 1 else ""

    def eval_keys(self) -> list[str]:
        return sorted({k for r in self.runs for k in r.eval_keys()})

    def final(self, key: str) -> Stat:
        return Stat.of([r.final(key) for r in self.runs])

    def best(self, key: str) -> Stat:
        return Stat.of([r.best(key) for r in self.runs])

    def throughput(self, key: str) -> Stat:
        return Stat.of([r.throughput(key) for r in self.runs])

    def final_loss(self) -> Stat:
        return Stat.of([r.final_loss() for r in self.runs])

    def published(self) -> PublishedResult | None:
        if not self.reference:
            return None
        try:
            return lookup(self.reference)
        except KeyError:
            return None


def group_runs(runs: list[RunRecord]) -> list[Group]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    return [Group(name, sorted(rs, key=lambda r: r.seed)) for name, rs in groups.items()]


def pick_baseline(groups: list[Group], wanted: str | None) -> Group | None:
    """``--baseline NAME``; by default the group named ``baseline`` or the one name ending in ``baseline``."""
    by_name = {g.name: g for g in groups}
    if wanted is not None:
        if wanted not in by_name:
            raise ValueError(f"--baseline {wanted!r} is not among the runs' recipe names: {', '.join(sorted(by_name))}")
        return by_name[wanted]
    if "baseline" in by_name:
        return by_name["baseline"]
    candidates = [g for g in groups if g.name.endswith("baseline")]
    return candidates[0] if len(candidates) == 1 else None


def order_groups(groups: list[Group], baseline: Group | None) -> list[Group]:
    """The baseline first, the rest by name."""
    rest = sorted((g for g in groups if g is not baseline), key=lambda g: g.name)
    return [baseline, *rest] if baseline is not None else rest


# --------------------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}"


def fmt_stat(stat: Stat) -> str:
    if stat.mean is None:
        return "–"
    return fmt(stat.mean) if stat.std is None else f"{fmt(stat.mean)} ± {fmt(stat.std, 2)}"


def fmt_delta(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3g}"


def delta(stat: Stat, base: Stat) -> float | None:
    if stat.mean is None or base.mean is None:
        return None
    return stat.mean - base.mean


def published_cell(row: PublishedResult | None) -> str:
    if row is None:
        return "–"
    values = " / ".join(fmt(v) for v in row.metrics().values())
    base = baseline_of(row.key)
    if base is row:
        return f"{values} (published baseline)"
    diffs = " / ".join(fmt_delta(row.metrics()[m] - base.metrics()[m]) for m in PUBLISHED_METRICS)
    return f"{values} (Δ {diffs})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown(groups: list[Group], baseline: Group | None) -> str:
    headline = sorted({k for g in groups for k in g.eval_keys() if is_headline(k)})
    all_keys = sorted({k for g in groups for k in g.eval_keys()})
    lines = ["# Ablation report", ""]
    n_runs = sum(len(g.runs) for g in groups)
    lines.append(
        f"{len(groups)} recipe(s), {n_runs} run(s). Values are mean ± sample std over seeds (n − 1); "
        + (f"Δ is the difference of means from **{baseline.name}**." if baseline else "no baseline group, no Δ.")
    )
    directions = ", ".join(f"`{k.removeprefix('eval/')}` {'↑' if higher_is_better(k) else '↓'}" for k in headline)
    if directions:
        lines.append(f"Better is: {directions} (↑ higher, ↓ lower).")
    lines.append("")

    lines += ["## Final evaluation", ""]
    header = ["recipe", "seeds", "steps", "train loss"]
    for key in headline:
        header += [key.removeprefix("eval/"), "Δ"]
    header += ["images/s", "batches/s", "published FID / CMMD / DINO-MMD (Δ vs published baseline)"]
    rows = []
    for group in groups:
        row = [group.name, " ".join(str(s) for s in group.seeds), str(min(r.last_step for r in group.runs))]
        row.append(fmt_stat(group.final_loss()))
        for key in headline:
            stat = group.final(key)
            compare = baseline is not None and group is not baseline
            row += [fmt_stat(stat), fmt_delta(delta(stat, baseline.final(key))) if compare and baseline else "–"]
        row += [fmt_stat(group.throughput(k)) for k in THROUGHPUT_KEYS]
        row.append(published_cell(group.published()))
        rows.append(row)
    lines += _table(header, rows)

    lines += ["", "## Best value over the run", ""]
    header = ["recipe", *(k.removeprefix("eval/") for k in headline)]
    lines += _table(header, [[g.name, *(fmt_stat(g.best(k)) for k in headline)] for g in groups])

    lines += ["", "## Every evaluation key (final)", ""]
    header = ["key", *(g.name for g in groups)]
    lines += _table(header, [[k, *(fmt_stat(g.final(k)) for g in groups)] for k in all_keys])

    lines += ["", "## Runs", ""]
    lines += _table(
        ["recipe", "seed", "steps", "reference", "directory"],
        [[r.name, str(r.seed), str(r.last_step), r.reference or "–", str(r.path)] for g in groups for r in g.runs],
    )
    return "\n".join(lines) + "\n"


def _csv_number(value: float | None) -> str:
    return "" if value is None else repr(value)


def write_csvs(groups: list[Group], baseline: Group | None, out: Path) -> None:
    all_keys = sorted({k for g in groups for k in g.eval_keys()})
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        header = ["recipe", "n_runs", "seeds", "reference", "train_loss_mean", "train_loss_std"]
        for key in all_keys:
            header += [f"{key}:final_mean", f"{key}:final_std", f"{key}:final_delta", f"{key}:best_mean"]
            header += [f"{key}:best_std"]
        for key in THROUGHPUT_KEYS:
            header += [f"{key}_mean", f"{key}_std"]
        header += [f"published_{m}" for m in (*PUBLISHED_METRICS, "batches_per_s")]
        writer.writerow(header)
        for group in groups:
            loss = group.final_loss()
            row = [group.name, str(len(group.runs)), " ".join(map(str, group.seeds)), group.reference]
            row += [_csv_number(loss.mean), _csv_number(loss.std)]
            for key in all_keys:
                final, best = group.final(key), group.best(key)
                row += [_csv_number(final.mean), _csv_number(final.std)]
                row.append(_csv_number(delta(final, baseline.final(key)) if baseline else None))
                row += [_csv_number(best.mean), _csv_number(best.std)]
            for key in THROUGHPUT_KEYS:
                stat = group.throughput(key)
                row += [_csv_number(stat.mean), _csv_number(stat.std)]
            published = group.published()
            if published is None:
                row += [""] * (len(PUBLISHED_METRICS) + 1)
            else:
                row += [_csv_number(v) for v in published.metrics().values()]
                row.append(_csv_number(published.batches_per_s))
            writer.writerow(row)
    with (out / "runs.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["recipe", "seed", "steps", "run_dir", "train_loss", *THROUGHPUT_KEYS, *all_keys])
        for group in groups:
            for run in group.runs:
                writer.writerow(
                    [run.name, run.seed, run.last_step, str(run.path), _csv_number(run.final_loss())]
                    + [_csv_number(run.throughput(k)) for k in THROUGHPUT_KEYS]
                    + [_csv_number(run.final(k)) for k in all_keys]
                )


# --------------------------------------------------------------------------- plots


def _mean_curve(runs: list[RunRecord], key: str, lines_of: str) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every run, with the mean and std (0 for one run) of ``key`` across runs."""
    per_run = [
        {int(line["step"]): float(line[key]) for line in getattr(r, lines_of) if key in line}
        for r in runs
        if any(key in line for line in getattr(r, lines_of))
    ]
    if not per_run:
        return [], [], []
    steps = sorted(set.intersection(*(set(d) for d in per_run)))
    means = [statistics.fmean(d[s] for d in per_run) for s in steps]
    stds = [statistics.stdev([d[s] for d in per_run]) if len(per_run) > 1 else 0.0 for s in steps]
    return steps, means, stds


def write_plots(groups: list[Group], out: Path) -> list[Path]:
    """PNG plots; an empty list (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: no plots: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return []
    written: list[Path] = []

    def curves(key: str, lines_of: str, path: Path, ylabel: str, log: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        lowest = math.inf
        for group in groups:
            steps, means, stds = _mean_curve(group.runs, key, lines_of)
            if not steps:
                continue
            drawn = True
            marker = "o" if len(steps) < 12 else None
            (line,) = ax.plot(steps, means, marker=marker, label=f"{group.name} (n={len(group.runs)})")
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.15)
            lowest = min(lowest, *means)
        if drawn:
            if log and lowest > 0:
                ax.set_yscale("log")  # diffusion losses fall by orders of magnitude
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel}: mean ± std over seeds")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)

    curves("loss", "train", out / "loss.png", "training loss", log=True)
    headline = sorted({k for g in groups for k in g.eval_keys() if is_headline(k)})
    for key in headline:
        name = key.removeprefix("eval/")
        curves(key, "evals", out / f"eval_{name}.png", name)

    if headline:
        fig, axes = plt.subplots(1, len(headline), figsize=(3.2 * len(headline) + 1, 4.5), squeeze=False)
        for ax, key in zip(axes[0], headline, strict=True):
            stats = [g.final(key) for g in groups]
            xs = list(range(len(groups)))
            ax.bar(
                xs,
                [s.mean if s.mean is not None else 0.0 for s in stats],
                yerr=[s.std or 0.0 for s in stats],
                capsize=3,
                color=[f"C{i % 10}" for i in xs],
            )
            ax.set_xticks(xs, [g.name for g in groups], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{key.removeprefix('eval/')} {'↑' if higher_is_better(key) else '↓'}")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("final evaluation: mean ± std over seeds")
        fig.tight_layout()
        fig.savefig(out / "final.png", dpi=120)
        plt.close(fig)
        written.append(out / "final.png")
    return written


# --------------------------------------------------------------------------- command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prx-run report",
        description="Tables (markdown, CSV) and plots comparing runs grouped by recipe name, mean ± std over seeds.",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run directories, or folders searched for them")
    p.add_argument("--out", type=Path, help="output folder (default: PATH/report for one PATH, else ./report)")
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="recipe name the Δ columns compare with (default: 'baseline', or the one name ending in 'baseline')",
    )
    return p


def build(paths: list[Path], out: Path, baseline_name: str | None = None) -> tuple[str, list[Path]]:
    """Read the runs under ``paths`` and write the report into ``out``; returns (markdown, files)."""
    runs = [read_run(p) for p in find_runs(paths)]
    if not runs:
        raise FileNotFoundError(f"no run directories (with recipe.toml) under {', '.join(map(str, paths))}")
    groups = group_runs(runs)
    baseline = pick_baseline(groups, baseline_name)
    groups = order_groups(groups, baseline)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, baseline)
    (out / "report.md").write_text(text, encoding="utf-8")
    write_csvs(groups, baseline, out)
    files = [out / "report.md", out / "summary.csv", out / "runs.csv", *write_plots(groups, out)]
    return text, files


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = args.out or (args.paths[0] / "report" if len(args.paths) == 1 else Path("report"))
    try:
        text, files = build(args.paths, out, args.baseline)
    except (FileNotFoundError, ValueError, KeyError, tomllib.TOMLDecodeError) as err:
        print(f"prx-run report: {err}", file=sys.stderr)
        return 1
    print(text)
    print("written: " + ", ".join(str(f) for f in files))
    return 0
