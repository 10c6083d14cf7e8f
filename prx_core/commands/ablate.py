"""``prx-run ablate``: train several recipes over several seeds, one run after another.

    prx-run ablate RECIPE... [--seeds 0 1] [--runs-root DIR] [--set KEY=VALUE ...] [--nproc N] [--print]

Each (recipe, seed) pair is an ordinary ``prx-run`` subprocess writing ``<runs-root>/<recipe
name>/seed<k>`` with ``--set seed=<k> --resume auto``, so:

* a finished run (its last checkpoint is at the recipe's last step and ``final/`` was exported) is
  skipped, and re-running the same command after an interruption only does what is left;
* a partial run continues from its newest valid checkpoint;
* a run that fails does not stop the others: the command ends with a summary and exits 1 if any
  run failed.

Every recipe is validated before anything starts, and two recipes with the same ``name`` are
refused, since they would share run directories (reference.md §7.5). ``--print`` only prints one launch
command per run (``torchrun`` when ``--nproc`` > 1), e.g. to paste into cluster job scripts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prx_core import runlock
from prx_core.config import RecipeError

#: Where runs go without ``--runs-root``.
DEFAULT_RUNS_ROOT = Path("runs") / "ablate"


@dataclass(frozen=True)
class PlannedRun:
    """One (recipe, seed) pair and where it runs."""

    recipe_path: Path
    name: str
    seed: int
    run_dir: Path
    #: ``--set`` overrides passed to the run: the command line's, then ``seed=<k>``.
    overrides: tuple[str, ...]
    #: Global step the run ends at (the last stage's, for a staged recipe).
    last_step: int
    #: Run directory of the part that ends the run: ``run_dir``, or the last stage's directory.
    output_dir: Path

    @property
    def label(self) -> str:
        return f"{self.name}/seed{self.seed}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prx-run ablate",
        description="Train each recipe for each seed, one run after another, into RUNS_ROOT/<name>/seed<k>. "
        "Finished runs are skipped and partial ones resumed, so the same command continues an interrupted study.",
    )
    p.add_argument("recipes", nargs="+", type=Path, help="recipe TOML files (each must have a distinct 'name')")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="K",
        help="seeds to run every recipe with (default: each recipe's own 'seed'); a seed changes the "
        "initialisation, the data order and every random draw",
    )
    p.add_argument(
        "--runs-root", type=Path, default=DEFAULT_RUNS_ROOT, help=f"parent of the run directories ({DEFAULT_RUNS_ROOT})"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every run, e.g. --set train.steps=100 (validated like the file)",
    )
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) for data parallelism (1)")
    p.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print one launch command per run instead of running them (finished runs are commented out)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="runs log warnings and errors only")
    return p


def plan(args: argparse.Namespace) -> list[PlannedRun]:
    """Validate every recipe (with its seed) and lay out the runs; RecipeError on any problem."""
    from prx_core.recipe import load

    if any(o.split("=", 1)[0].strip() == "seed" for o in args.overrides):
        raise RecipeError("--set seed=... is not used by prx-run ablate; pass --seeds instead")
    if args.nproc < 1:
        raise RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    runs: list[PlannedRun] = []
    owners: dict[str, Path] = {}
    for path in args.recipes:
        recipe = load(path, list(args.overrides))
        if recipe.name in owners:
            raise RecipeError(
                f"{path} and {owners[recipe.name]} both have name '{recipe.name}'; every recipe of an ablation needs "
                "its own name, which names its run directories"
            )
        owners[recipe.name] = path
        for seed in args.seeds if args.seeds is not None else [recipe.seed]:
            overrides = (*args.overrides, f"seed={seed}")
            seeded = load(path, list(overrides))  # validates the seed too (e.g. a negative one)
            run_dir = args.runs_root / recipe.name / f"seed{seed}"
            if seeded.stages:
                last = seeded.stages[-1]
                output_dir, last_step = run_dir / "stages" / last.dir_name, last.last_step
            else:
                output_dir, last_step = run_dir, seeded.train.steps
            runs.append(PlannedRun(path, recipe.name, seed, run_dir, overrides, last_step, output_dir))
    return runs


def is_finished(run: PlannedRun) -> bool:
    """The run's last checkpoint is at its last step and the trained model was exported."""
    checkpoint = run.output_dir / "checkpoints" / f"step_{run.last_step:08d}"
    return (checkpoint / "COMMIT").is_file() and (run.output_dir / "final" / "transformer").is_dir()


def has_checkpoint(run: PlannedRun) -> bool:
    return any(run.run_dir.glob("checkpoints/step_*/COMMIT")) or any(
        run.run_dir.glob("stages/*/checkpoints/step_*/COMMIT")
    )


def launch_command(run: PlannedRun, nproc: int, quiet: bool = False, for_shell: bool = False) -> list[str]:
    """The command that trains ``run``: ``prx-run`` (or ``torchrun``) for a shell, this Python otherwise."""
    args = [str(run.recipe_path), "--run-dir", str(run.run_dir), "--resume", "auto"]
    for override in run.overrides:
        args += ["--set", override]
    if quiet:
        args.append("--quiet")
    if nproc > 1:
        launcher = ["torchrun"] if for_shell else [sys.executable, "-m", "torch.distributed.run"]
        return [*launcher, "--standalone", "--nproc_per_node", str(nproc), "-m", "prx_core.cli", *args]
    return ["prx-run", *args] if for_shell else [sys.executable, "-m", "prx_core.cli", *args]


def _set_aside_stale_metrics(run: PlannedRun) -> None:
    """A run directory without any checkpoint holds an attempt that saved nothing; the next attempt
    starts from step 0, so its metrics.jsonl must not be appended to the old one."""
    if has_checkpoint(run):
        return
    for metrics in [run.run_dir / "metrics.jsonl", *run.run_dir.glob("stages/*/metrics.jsonl")]:
        if metrics.is_file():
            target = metrics.with_name(f"metrics.stale-{int(time.time())}.jsonl")
            metrics.rename(target)
            print(f"ablate: {run.label}: no checkpoint from the earlier attempt; moved {metrics} to {target.name}")


def _run(command: list[str]) -> int:
    """Run one training subprocess. Ctrl-C reaches it too (same process group): let it checkpoint."""
    process = subprocess.Popen(command, env={**os.environ})
    try:
        return process.wait()
    except KeyboardInterrupt:
        print("\nablate: interrupted; waiting for the run to checkpoint and stop (Ctrl-C again to kill it)")
        try:
            process.wait()
        except KeyboardInterrupt:
            process.kill()
            process.wait()
        raise


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        runs = plan(args)
    except RecipeError as err:
        print(f"prx-run ablate: {err}", file=sys.stderr)
        return 2

    if args.print_only:
        for run in runs:
            line = shlex.join(launch_command(run, args.nproc, args.quiet, for_shell=True))
            print(f"# finished: {line}" if is_finished(run) else line)
        return 0

    n_recipes = len({r.name for r in runs})
    print(f"ablate: {len(runs)} run(s) ({n_recipes} recipe(s)) into {args.runs_root}")
    results: list[tuple[PlannedRun, str, float]] = []
    interrupted = False
    for i, run in enumerate(runs, start=1):
        if is_finished(run):
            print(f"ablate [{i}/{len(runs)}] {run.label}: finished earlier, skipped")
            results.append((run, "skipped (finished)", 0.0))
            continue
        holder = runlock.live_holder(run.run_dir)
        if holder is not None:  # leave a live run's directory (and its metrics) untouched
            print(f"ablate [{i}/{len(runs)}] {run.label}: {run.run_dir} is in use ({holder.describe()}), skipped")
            results.append((run, f"FAILED (run directory in use by {holder.host} pid {holder.pid})", 0.0))
            continue
        resuming = has_checkpoint(run)
        _set_aside_stale_metrics(run)
        print(f"ablate [{i}/{len(runs)}] {run.label}: {'resuming' if resuming else 'starting'} in {run.run_dir}")
        sys.stdout.flush()
        started = time.perf_counter()
        try:
            code = _run(launch_command(run, args.nproc, args.quiet))
        except KeyboardInterrupt:
            results.append((run, "interrupted", time.perf_counter() - started))
            interrupted = True
            break
        elapsed = time.perf_counter() - started
        if code == 0 and is_finished(run):
            status = "ok"
        elif code == 0:
            status = "stopped early (resume with the same command)"
        else:
            status = f"FAILED (exit {code}; see {run.output_dir / 'train.log'})"
        results.append((run, status, elapsed))

    print("\nablate summary:")
    width = max(len(r.label) for r, _, _ in results) if results else 0
    for run, status, elapsed in results:
        took = f"  {_minutes(elapsed)}" if elapsed else ""
        print(f"  {run.label:<{width}}  {status}{took}")
    if len(results) < len(runs):
        print(f"  {len(runs) - len(results)} run(s) not started")
    failed = [r for r, s, _ in results if s.startswith("FAILED")]
    incomplete = [r for r, s, _ in results if s.startswith(("stopped", "interrupted"))]
    total = sum(e for _, _, e in results)
    print(f"{len(runs)} run(s): {len(failed)} failed, {len(incomplete)} incomplete, in {_minutes(total)}")
    print(f"next: prx-run report {args.runs_root}")
    if interrupted:
        return 130
    return 1 if failed or incomplete else 0
