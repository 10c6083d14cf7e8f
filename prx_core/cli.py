"""``prx-run``: train a recipe, check recipes, list plugins.

    prx-run RECIPE [--set KEY=VALUE ...] [--run-dir DIR] [--resume auto|PATH] [--allow-drift]
    prx-run check PATH [PATH ...] [--set KEY=VALUE ...]
    prx-run plugins

Torch is imported only by the training command, so ``check`` and ``plugins`` answer fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from prx_core.config import RecipeError

COMMANDS = ("check", "plugins")


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx-run",
        description="Train a recipe. Other commands: 'prx-run check PATH...', 'prx-run plugins'.",
    )
    parser.add_argument("recipe", type=Path, help="recipe TOML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value (validated like the file), e.g. --set train.steps=10",
    )
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<recipe name>)")
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="'auto': continue from the newest valid checkpoint in the run directory, if any",
    )
    parser.add_argument(
        "--allow-drift",
        action="store_true",
        help="accept a resume whose recipe differs from the checkpoint's (logged)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prx-run check", description="Validate recipes without building models.")
    parser.add_argument("paths", nargs="+", type=Path, help="recipe files or folders (searched for *.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("prx")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def cmd_plugins() -> int:
    from prx_core import __version__
    from prx_core.plugins import builtin_modules, installed_plugins, plugin_info

    print(f"prx-core {__version__}")
    print("\ncore plugins (always active):")
    for module in builtin_modules():
        info = plugin_info(module)
        print(f"  {info.name:<18} {__version__:<9} {info.summary}  [{info.spec}]")
    installed = installed_plugins()
    print("\ninstalled plugins (active only when a recipe names them):")
    if not installed:
        print("  none")
    for name, plugin in sorted(installed.items()):
        print(f"  {name:<18} {plugin.version:<9} {plugin.distribution} ({plugin.module})")
    return 0


def _recipe_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(path.rglob("*.toml")))
        else:
            files.append(path)
    return files


def cmd_check(argv: list[str]) -> int:
    from prx_core.recipe import load

    args = _check_parser().parse_args(argv)
    failures = 0
    files = _recipe_files(args.paths)
    if not files:
        print("prx-run check: no recipe files found", file=sys.stderr)
        return 2
    for path in files:
        try:
            recipe = load(path, args.overrides)
        except RecipeError as err:
            failures += 1
            print(f"FAIL {path}\n     {err}", file=sys.stderr)
            continue
        chosen = ", ".join(f"{slot}={c.use}" for slot, c in recipe.slots.items())
        extra = f"; plugins: {', '.join(recipe.plugins)}" if recipe.plugins else ""
        print(f"ok   {path} ({chosen}{extra})")
    print(f"{len(files) - failures} ok, {failures} failed")
    return 1 if failures else 0


def cmd_train(argv: list[str]) -> int:
    args = _train_parser().parse_args(argv)
    _setup_logging(args.quiet)
    from prx_core.recipe import load

    try:
        recipe = load(args.recipe, args.overrides)
    except RecipeError as err:
        print(f"prx-run: invalid recipe: {err}", file=sys.stderr)
        return 2

    from prx_core.distributed import shutdown
    from prx_core.trainer import Trainer, TrainingError

    run_dir = args.run_dir or Path("runs") / recipe.name
    trainer = Trainer(recipe, run_dir, resume=args.resume, allow_drift=args.allow_drift, command=sys.argv)
    started = time.perf_counter()
    try:
        trainer.setup()
        result = trainer.fit()
    except (TrainingError, RecipeError) as err:
        print(f"prx-run: {err}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if not trainer.dist.is_main:
        return 0
    minutes = (time.perf_counter() - started) / 60
    state = "stopped early at" if result.stopped_early else "finished"
    print(f"\n{recipe.name}: {state} step {result.step} in {minutes:.1f} min, final loss {result.final_loss:.4f}")
    print(f"run directory: {run_dir}")
    for label, rel in (
        ("resolved recipe", "recipe.toml"),
        ("metrics", "metrics.jsonl"),
        ("samples", "samples/"),
        ("checkpoints", "checkpoints/"),
        ("diffusers export", "final/transformer/"),
    ):
        if (run_dir / rel).exists():
            print(f"  {label:<17} {run_dir / rel}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plugins":
        return cmd_plugins()
    if argv and argv[0] == "check":
        return cmd_check(argv[1:])
    return cmd_train(argv)


if __name__ == "__main__":
    sys.exit(main())
