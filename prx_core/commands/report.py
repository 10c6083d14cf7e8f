"""``prx-run report``: compare runs, grouped by recipe over seeds.

    prx-run report RUN_DIR_OR_ROOT... [--out DIR] [--baseline NAME] [--confidence 0.95]

Each argument is a run directory or a folder searched for run directories (``prx-run ablate``'s
runs root, for instance). Runs are grouped by recipe ``name``; every number is the mean ± sample
standard deviation (n − 1 in the denominator) over the group's seeds. Written to ``--out``:

* ``report.md``: the final evaluation (headline metrics with their difference from the baseline
  group), the differences with their confidence intervals (below), training throughput, the
  published reference.md §5 numbers of the row the recipe names with ``reference``, the best value
  of every metric over the run, and every evaluation key in full;
* ``summary.csv`` (one row per recipe), ``runs.csv`` (one row per run) and ``comparisons.csv``
  (one row per recipe and evaluation key: Δ, its interval, n, the method);
* ``loss.png`` (training loss), ``eval_<metric>.png`` (each headline metric against steps),
  ``final.png`` (final headline metrics as bars with their std) and ``delta.png`` (each recipe's Δ
  with its interval as an error bar), when matplotlib is installed.

Differences from the baseline are *paired* by seed when both groups ran the same seeds: runs with
the same seed share the data order, the noise draws and the initial weights of every shared
module, so the per-seed difference cancels most of the seed noise. Δ is then the mean of the
per-seed differences, with a Student-t interval on n − 1 degrees of freedom. Where the seeds differ,
the comparison falls back to the unpaired Welch interval (Welch–Satterthwaite degrees of freedom).
A Δ whose interval excludes 0 is marked ✱. The t quantile is computed here
(:func:`student_t_quantile`), so the report needs no scipy.

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

    def final_by_seed(self, key: str) -> list[tuple[int, float]]:
        """(seed, final value) of every run that reported a finite ``key``, in seed order."""
        values = [(r.seed, r.final(key)) for r in self.runs]
        return [(seed, v) for seed, v in values if v is not None and math.isfinite(v)]

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


# --------------------------------------------------------------------------- confidence intervals


#: Confidence level of the intervals without ``--confidence``.
DEFAULT_CONFIDENCE = 0.95
#: Continued-fraction terms before the incomplete beta function gives up (it needs about
#: √max(a, b) terms; a Welch or paired t has a few degrees of freedom, so this is never reached).
_BETA_MAX_TERMS = 10_000
_BETA_EPS = 1e-15
#: Stands in for an exact zero in the modified Lentz recursion, whose divisions it would break.
_LENTZ_TINY = 1e-300


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the regularized incomplete beta function,
    I_x(a, b) = x^a (1 − x)^b / (a·B(a, b)) · 1 / (1 + d1 / (1 + d2 / (1 + …))), with
    d_{2m+1} = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)) and
    d_{2m} = m (b − m) x / ((a + 2m − 1)(a + 2m)), evaluated front to back by the modified Lentz
    method. It converges fast for x < (a + 1) / (a + b + 2); callers use the symmetry
    I_x(a, b) = 1 − I_{1−x}(b, a) beyond that."""

    def guard(value: float) -> float:
        return value if abs(value) > _LENTZ_TINY else _LENTZ_TINY

    c = 1.0
    d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    fraction = d
    for m in range(1, _BETA_MAX_TERMS):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 / guard(1.0 + even * d)
        c = guard(1.0 + even / c)
        fraction *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 / guard(1.0 + odd * d)
        c = guard(1.0 + odd / c)
        step = d * c
        fraction *= step
        if abs(step - 1.0) < _BETA_EPS:
            return fraction
    raise ArithmeticError(f"incomplete beta I_x(a, b) did not converge for x={x}, a={a}, b={b}")


def _beta_series_part(x: float, one_minus_x: float, a: float, b: float) -> float:
    """x^a (1 − x)^b / (a·B(a, b)) times the continued fraction: I_x(a, b) where it converges.
    ``one_minus_x`` is passed in so that callers holding it exactly (t²/(ν + t²)) lose no digits."""
    log_front = a * math.log(x) + b * math.log(one_minus_x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for 0 ≤ x ≤ 1 and a, b > 0."""
    if a <= 0 or b <= 0 or not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta needs 0 <= x <= 1 and a, b > 0; got x={x}, a={a}, b={b}")
    if x == 0.0 or x == 1.0:
        return x
    if x < (a + 1.0) / (a + b + 2.0):
        return _beta_series_part(x, 1.0 - x, a, b)
    return 1.0 - _beta_series_part(1.0 - x, x, b, a)


def student_t_upper_tail(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` (real, > 0) degrees of freedom.

    For t ≥ 0, P(T > t) = ½·I_{ν/(ν+t²)}(ν/2, ½). Both x = ν/(ν + t²) and 1 − x = t²/(ν + t²)
    are formed directly, so neither large nor small t loses digits to a subtraction."""
    if df <= 0 or not math.isfinite(df):
        raise ValueError(f"degrees of freedom must be finite and > 0, got {df}")
    if t < 0:
        return 1.0 - student_t_upper_tail(-t, df)
    if t == 0:
        return 0.5
    if math.isinf(t):
        return 0.0
    x, one_minus_x = df / (df + t * t), t * t / (df + t * t)
    a, b = df / 2.0, 0.5
    if x < (a + 1.0) / (a + b + 2.0):
        return 0.5 * _beta_series_part(x, one_minus_x, a, b)
    return 0.5 * (1.0 - _beta_series_part(one_minus_x, x, b, a))


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p, for Student's t with ``df`` (real, > 0) degrees of freedom.

    Bisection on the upper tail (monotone, formed without cancellation by
    :func:`student_t_upper_tail`) after doubling the bracket until it holds the root; stops when
    the bracket is as narrow as a float allows. ``student_t_quantile(0.975, 1)`` is 12.7062."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if df <= 0 or not math.isfinite(df):
        raise ValueError(f"degrees of freedom must be finite and > 0, got {df}")
    if p == 0.5:
        return 0.0
    # By symmetry only upper quantiles are searched for; a small p is used as the tail itself,
    # not as 1 − (1 − p), which would lose its digits.
    return _upper_tail_quantile(1.0 - p, df) if p > 0.5 else -_upper_tail_quantile(p, df)


def _upper_tail_quantile(tail: float, df: float) -> float:
    """The t ≥ 0 with P(T > t) = tail, for 0 < tail < ½."""
    low, high = 0.0, 1.0
    while student_t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
        if high > 1e300:
            raise ArithmeticError(f"t quantile out of range for an upper tail of {tail}, df={df}")
    for _ in range(2000):
        middle = 0.5 * (low + high)
        if middle <= low or middle >= high:
            break  # adjacent floats: as exact as it gets
        if student_t_upper_tail(middle, df) > tail:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A difference with its confidence interval; ``low``/``high`` are None where there is none."""

    delta: float
    low: float | None
    high: float | None
    #: Degrees of freedom of the t used (n − 1 paired, Welch–Satterthwaite unpaired).
    df: float | None
    #: The t quantile at (1 + confidence) / 2: half the interval is t times the standard error.
    t: float | None
    #: Why the interval is missing, degenerate or wide; empty when there is nothing to say.
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"--confidence must be strictly between 0 and 1 (e.g. 0.95), got {confidence}")


def _small_n_note(n: int, df: float, t: float) -> str:
    return f"n = {n}: t with {df:.3g} df is {t:.2f}, so the interval is wide"


def paired_interval(differences: list[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Mean of per-seed differences d_i = ablation_i − baseline_i with the Student-t interval
    d̄ ± t_{(1+c)/2, n−1} · s_d / √n (s_d the sample std of the d_i)."""
    _check_confidence(confidence)
    n = len(differences)
    if n == 0:
        raise ValueError("paired_interval needs at least one difference")
    mean = statistics.fmean(differences)
    if n == 1:
        return Interval(mean, None, None, None, None, "n = 1: a single seed pair, no interval")
    df = float(n - 1)
    t = student_t_quantile((1.0 + confidence) / 2.0, df)
    half = t * statistics.stdev(differences) / math.sqrt(n)
    note = _small_n_note(n, df, t) if n < 3 else ""
    if half == 0.0:
        note = "every seed pair differs by exactly the same amount: an interval of zero width"
    return Interval(mean, mean - half, mean + half, df, t, note)


def welch_interval(ablation: list[float], baseline: list[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Difference of means ā − b̄ with the unpaired Welch interval: standard error
    √(s_a²/n_a + s_b²/n_b) and Welch–Satterthwaite degrees of freedom
    (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a − 1) + (s_b²/n_b)²/(n_b − 1))."""
    _check_confidence(confidence)
    if not ablation or not baseline:
        raise ValueError("welch_interval needs at least one value in each group")
    mean = statistics.fmean(ablation) - statistics.fmean(baseline)
    n_a, n_b = len(ablation), len(baseline)
    if min(n_a, n_b) < 2:
        return Interval(mean, None, None, None, None, "n = 1 in a group: no spread to estimate, no interval")
    var_a, var_b = statistics.variance(ablation) / n_a, statistics.variance(baseline) / n_b
    if var_a + var_b == 0.0:
        return Interval(mean, mean, mean, None, None, "no spread in either group: an interval of zero width")
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    t = student_t_quantile((1.0 + confidence) / 2.0, df)
    half = t * math.sqrt(var_a + var_b)
    note = _small_n_note(min(n_a, n_b), df, t) if min(n_a, n_b) < 3 else ""
    return Interval(mean, mean - half, mean + half, df, t, note)


@dataclass(frozen=True)
class Comparison:
    """One recipe's final value of one key against the baseline's: Δ = recipe − baseline."""

    key: str
    #: "paired" (same seeds: mean of per-seed differences) or "Welch" (unpaired).
    method: str
    interval: Interval
    #: Seeds of the pairs (paired), or of the recipe's runs (Welch).
    seeds: tuple[int, ...]
    baseline_seeds: tuple[int, ...]
    confidence: float
    #: Why Welch was used instead of pairing; empty for paired comparisons.
    reason: str = ""

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def excludes_zero(self) -> bool:
        return self.interval.excludes_zero

    @property
    def verdict(self) -> str:
        """'better' or 'worse' (by the key's direction) when the interval excludes 0, else ''."""
        if not self.excludes_zero:
            return ""
        up = self.interval.delta > 0
        return "better" if up == higher_is_better(self.key) else "worse"


def compare(group: Group, baseline: Group, key: str, confidence: float = DEFAULT_CONFIDENCE) -> Comparison | None:
    """Paired when both groups ran exactly the same seeds (each once) with a value for ``key``;
    Welch over every value otherwise. None when either group has no value."""
    mine, theirs = group.final_by_seed(key), baseline.final_by_seed(key)
    if not mine or not theirs:
        return None
    seeds, baseline_seeds = tuple(s for s, _ in mine), tuple(s for s, _ in theirs)
    unique = len(set(seeds)) == len(seeds) and len(set(baseline_seeds)) == len(baseline_seeds)
    if unique and set(seeds) == set(baseline_seeds):
        by_seed = dict(theirs)
        differences = [value - by_seed[seed] for seed, value in mine]
        return Comparison(key, "paired", paired_interval(differences, confidence), seeds, seeds, confidence)
    if not unique:
        reason = "a seed appears twice in a group"
    else:
        reason = f"seeds differ: {' '.join(map(str, seeds))} vs {' '.join(map(str, baseline_seeds))}"
    interval = welch_interval([v for _, v in mine], [v for _, v in theirs], confidence)
    return Comparison(key, "Welch", interval, seeds, baseline_seeds, confidence, reason)


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


#: Appended to a Δ whose confidence interval excludes 0.
MARK = "✱"

#: (recipe name, evaluation key) → that recipe's comparison with the baseline.
Comparisons = dict[tuple[str, str], Comparison]


def comparisons(groups: list[Group], baseline: Group | None, confidence: float = DEFAULT_CONFIDENCE) -> Comparisons:
    """Every non-baseline group against the baseline, for every evaluation key either reports."""
    _check_confidence(confidence)
    found: Comparisons = {}
    if baseline is None:
        return found
    for group in groups:
        if group is baseline:
            continue
        for key in sorted(set(group.eval_keys()) | set(baseline.eval_keys())):
            comparison = compare(group, baseline, key, confidence)
            if comparison is not None:
                found[(group.name, key)] = comparison
    return found


def _percent(confidence: float) -> str:
    return f"{100 * confidence:.4g} %"


def fmt_marked_delta(comparison: Comparison | None) -> str:
    if comparison is None:
        return "–"
    text = fmt_delta(comparison.interval.delta)
    return f"{text} {MARK}" if comparison.excludes_zero else text


def fmt_interval(interval: Interval) -> str:
    if interval.low is None or interval.high is None:
        return "none"
    return f"[{fmt_delta(interval.low)}, {fmt_delta(interval.high)}]"


def _n_cell(comparison: Comparison) -> str:
    if comparison.method == "paired":
        return str(comparison.n)
    return f"{comparison.n} vs {len(comparison.baseline_seeds)}"


def _method_cell(comparison: Comparison) -> str:
    return comparison.method if not comparison.reason else f"{comparison.method} ({comparison.reason})"


def _paired_section(groups: list[Group], baseline: Group, found: Comparisons, keys: list[str]) -> list[str]:
    confidence = next(iter(found.values())).confidence if found else DEFAULT_CONFIDENCE
    level = _percent(confidence)
    lines = [f"## Differences from {baseline.name} (final evaluation)", ""]
    lines.append(
        f"Δ = recipe − {baseline.name}: *paired* rows average the per-seed differences (the same seed gives "
        "both runs the same data order, noise draws and initial weights, so most seed noise cancels), *Welch* "
        f"rows compare means where the seeds differ; the interval is Δ's {level} Student-t confidence interval "
        f"over seeds, and {MARK} marks one that excludes 0 (a difference larger than the seed noise), "
        "better or worse by the metric's direction."
    )
    lines.append("")
    header = ["recipe", "metric", "Δ", f"{level} interval", "n", "method", "df", MARK, "note"]
    rows = []
    small_n = False
    for group in groups:
        for key in keys:
            comparison = found.get((group.name, key))
            if comparison is None:
                continue
            interval = comparison.interval
            small_n = small_n or min(comparison.n, len(comparison.baseline_seeds)) < 3
            rows.append(
                [
                    group.name,
                    key.removeprefix("eval/"),
                    fmt_delta(interval.delta),
                    fmt_interval(interval),
                    _n_cell(comparison),
                    _method_cell(comparison),
                    "–" if interval.df is None else f"{interval.df:.3g}",
                    f"{MARK} {comparison.verdict}" if comparison.excludes_zero else "",
                    interval.note,
                ]
            )
    if not rows:
        return [*lines, "No recipe shares an evaluation key with the baseline.", ""]
    lines += _table(header, rows)
    if small_n:
        upper = (1.0 + confidence) / 2.0
        t1, t2, t4 = (student_t_quantile(upper, df) for df in (1, 2, 4))
        lines += [
            "",
            f"Fewer than 3 seeds: with n = 2 the t quantile has 1 degree of freedom ({t1:.2f} at {level}, "
            f"against {t2:.2f} with 3 seeds and {t4:.2f} with 5), so only large effects can be marked; "
            "n = 1 gives no interval at all.",
        ]
    return [*lines, ""]


def markdown(groups: list[Group], baseline: Group | None, found: Comparisons | None = None) -> str:
    """The report; ``found`` are the comparisons with the baseline (computed at 95 % when omitted)."""
    found = comparisons(groups, baseline) if found is None else found
    headline = sorted({k for g in groups for k in g.eval_keys() if is_headline(k)})
    all_keys = sorted({k for g in groups for k in g.eval_keys()})
    lines = ["# Ablation report", ""]
    n_runs = sum(len(g.runs) for g in groups)
    level = _percent(next(iter(found.values())).confidence) if found else _percent(DEFAULT_CONFIDENCE)
    lines.append(
        f"{len(groups)} recipe(s), {n_runs} run(s). Values are mean ± sample std over seeds (n − 1); "
        + (
            f"Δ is the difference of means from **{baseline.name}**, and {MARK} marks a Δ whose {level} "
            "confidence interval excludes 0 (see the differences below)."
            if baseline
            else "no baseline group, no Δ."
        )
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
            row += [fmt_stat(group.final(key)), fmt_marked_delta(found.get((group.name, key)))]
        row += [fmt_stat(group.throughput(k)) for k in THROUGHPUT_KEYS]
        row.append(published_cell(group.published()))
        rows.append(row)
    lines += _table(header, rows)
    lines.append("")

    if baseline is not None:
        lines += _paired_section(groups, baseline, found, headline)

    lines += ["## Best value over the run", ""]
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


#: Columns of comparisons.csv: the paired table's, with the numbers unformatted.
COMPARISON_COLUMNS = (
    "recipe",
    "baseline",
    "key",
    "method",
    "n",
    "seeds",
    "baseline_seeds",
    "delta",
    "ci_low",
    "ci_high",
    "confidence",
    "df",
    "t",
    "excludes_zero",
    "verdict",
    "note",
)


def _comparison_row(comparison: Comparison, recipe: str, baseline: str) -> list[str]:
    interval = comparison.interval
    note = "; ".join(x for x in (comparison.reason, interval.note) if x)
    return [
        recipe,
        baseline,
        comparison.key,
        comparison.method,
        str(comparison.n),
        " ".join(map(str, comparison.seeds)),
        " ".join(map(str, comparison.baseline_seeds)),
        _csv_number(interval.delta),
        _csv_number(interval.low),
        _csv_number(interval.high),
        _csv_number(comparison.confidence),
        _csv_number(interval.df),
        _csv_number(interval.t),
        str(comparison.excludes_zero).lower(),
        comparison.verdict,
        note,
    ]


def write_csvs(groups: list[Group], baseline: Group | None, out: Path, found: Comparisons | None = None) -> None:
    found = comparisons(groups, baseline) if found is None else found
    all_keys = sorted({k for g in groups for k in g.eval_keys()})
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        header = ["recipe", "n_runs", "seeds", "reference", "train_loss_mean", "train_loss_std"]
        for key in all_keys:
            header += [f"{key}:final_mean", f"{key}:final_std", f"{key}:final_delta"]
            header += [f"{key}:final_delta_low", f"{key}:final_delta_high", f"{key}:final_delta_method"]
            header += [f"{key}:final_delta_excludes_zero", f"{key}:best_mean", f"{key}:best_std"]
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
                comparison = found.get((group.name, key))
                if comparison is None:
                    row += ["", "", "", ""]
                else:
                    row += [_csv_number(comparison.interval.low), _csv_number(comparison.interval.high)]
                    row += [comparison.method, str(comparison.excludes_zero).lower()]
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
    with (out / "comparisons.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COMPARISON_COLUMNS)
        for group in groups:
            for key in all_keys:
                comparison = found.get((group.name, key))
                if comparison is not None and baseline is not None:
                    writer.writerow(_comparison_row(comparison, group.name, baseline.name))


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


def write_plots(
    groups: list[Group], out: Path, baseline: Group | None = None, found: Comparisons | None = None
) -> list[Path]:
    """PNG plots; an empty list (and a note) when matplotlib is missing. ``delta.png`` needs a
    baseline and its comparisons."""
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

    if baseline is not None and found:
        path = _delta_plot(plt, groups, baseline, found, headline, out / "delta.png")
        if path is not None:
            written.append(path)
    return written


def _delta_plot(
    plt: Any, groups: list[Group], baseline: Group, found: Comparisons, keys: list[str], path: Path
) -> Path | None:
    """Each recipe's Δ from the baseline per headline metric, its interval as the error bar; a
    filled marker where the interval excludes 0, a hollow one where it does not or is missing."""
    recipes = [g for g in groups if g is not baseline]
    keys = [k for k in keys if any((g.name, k) in found for g in recipes)]
    if not keys or not recipes:
        return None
    confidence = next(iter(found.values())).confidence
    fig, axes = plt.subplots(
        1, len(keys), figsize=(3.6 * len(keys) + 1.5, 0.45 * len(recipes) + 1.8), squeeze=False, sharey=True
    )
    ys = list(range(len(recipes)))
    for ax, key in zip(axes[0], keys, strict=True):
        ax.axvline(0.0, color="0.3", linewidth=1)
        for y, group in zip(ys, recipes, strict=True):
            comparison = found.get((group.name, key))
            if comparison is None:
                continue
            interval = comparison.interval
            color = {"better": "tab:green", "worse": "tab:red"}.get(comparison.verdict, "0.45")
            if interval.low is not None and interval.high is not None:
                xerr = [[interval.delta - interval.low], [interval.high - interval.delta]]
                ax.errorbar(interval.delta, y, xerr=xerr, fmt="none", ecolor=color, capsize=3)
            ax.plot(
                interval.delta,
                y,
                marker="o",
                color=color,
                markerfacecolor=color if comparison.excludes_zero else "white",
                linestyle="none",
            )
        ax.set_yticks(ys, [g.name for g in recipes], fontsize=7)
        ax.set_ylim(len(recipes) - 0.5, -0.5)  # first recipe on top, half a row of margin
        ax.locator_params(axis="x", nbins=5)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"Δ {key.removeprefix('eval/')} {'↑' if higher_is_better(key) else '↓'}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"final evaluation: Δ from {baseline.name} with {_percent(confidence)} intervals "
        "(filled: the interval excludes 0; no bar: a single seed, no interval)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command


def _confidence(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1 (e.g. 0.95 for 95 %), got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prx-run report",
        description="Tables (markdown, CSV) and plots comparing runs grouped by recipe name: mean ± std over "
        "seeds, and each recipe's difference from the baseline with a confidence interval (paired by seed).",
    )
    p.add_argument("paths", nargs="+", type=Path, help="run directories, or folders searched for them")
    p.add_argument("--out", type=Path, help="output folder (default: PATH/report for one PATH, else ./report)")
    p.add_argument(
        "--baseline",
        metavar="NAME",
        help="recipe name the Δ columns compare with (default: 'baseline', or the one name ending in 'baseline')",
    )
    p.add_argument(
        "--confidence",
        type=_confidence,
        default=DEFAULT_CONFIDENCE,
        metavar="C",
        help=f"confidence level of the intervals on Δ, in (0, 1) (default: {DEFAULT_CONFIDENCE})",
    )
    return p


def build(
    paths: list[Path], out: Path, baseline_name: str | None = None, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[str, list[Path]]:
    """Read the runs under ``paths`` and write the report into ``out``; returns (markdown, files)."""
    _check_confidence(confidence)
    runs = [read_run(p) for p in find_runs(paths)]
    if not runs:
        raise FileNotFoundError(f"no run directories (with recipe.toml) under {', '.join(map(str, paths))}")
    groups = group_runs(runs)
    baseline = pick_baseline(groups, baseline_name)
    groups = order_groups(groups, baseline)
    found = comparisons(groups, baseline, confidence)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(groups, baseline, found)
    (out / "report.md").write_text(text, encoding="utf-8")
    write_csvs(groups, baseline, out, found)
    tables = [out / "report.md", out / "summary.csv", out / "runs.csv", out / "comparisons.csv"]
    return text, [*tables, *write_plots(groups, out, baseline, found)]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    out = args.out or (args.paths[0] / "report" if len(args.paths) == 1 else Path("report"))
    try:
        text, files = build(args.paths, out, args.baseline, args.confidence)
    except (FileNotFoundError, ValueError, KeyError, tomllib.TOMLDecodeError) as err:
        print(f"prx-run report: {err}", file=sys.stderr)
        return 1
    print(text)
    print("written: " + ", ".join(str(f) for f in files))
    return 0
