"""``prx-run``: train a recipe, and the commands around a run (``prx-run --help`` lists them all).

    prx-run RECIPE [--set KEY=VALUE ...] [--run-dir DIR] [--resume auto|PATH] [--allow-drift]
    prx-run check PATH [PATH ...] [--set KEY=VALUE ...]
    prx-run show RECIPE [--set KEY=VALUE ...]
    prx-run diff A B
    prx-run plugins [-v | --json] [--hook HOOK]
    prx-run new-plugin NAME --kind KIND [--dir DIR]
    prx-run sample RUN_DIR --prompt TEXT [--prompt TEXT ...] [--steps N --cfg S --seed N --size PX]
    prx-run eval RUN_DIR [--checkpoint PATH] [--repeat K]
    prx-run export RUN_DIR OUT [--checkpoint PATH] [--weights sampling|trained]

Torch is imported only by the commands that need it, so ``check`` and ``plugins`` answer fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prx_core.config import RecipeError, suggest

if TYPE_CHECKING:  # torch-free import of the CLI: the trainer is imported where it is used
    from prx_core.trainer import Trainer


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prx-run",
        usage="prx-run RECIPE [options]  |  prx-run COMMAND [args]  (prx-run COMMAND --help for its options)",
        description="Train a recipe (the default command), or run one of the commands below.",
        epilog=commands_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "recipe",
        help="recipe: a TOML file, pkg:PACKAGE/PATH, ep:NAME/PATH, an https:// URL or hf://OWNER/REPO/PATH[@REV]",
    )
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
    parser.add_argument(
        "paths", nargs="+", help="recipe files or folders (searched for *.toml), or pkg:/ep:/URL/hf:// references"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also estimate each CUDA recipe's peak GPU memory (fake tensors, no GPU needed) and fail "
        "those that do not fit --gpu-gb",
    )
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory for --memory (default: 80)")
    parser.add_argument("--gpus", type=int, default=8, help="processes the recipes run on, for --memory (default: 8)")
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("prx")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def plugins_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prx-run plugins", description="List core and installed plugins.")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="per plugin: summary, distribution and version, slot entries, hooks, requires and conflicts, settings",
    )
    parser.add_argument("--json", action="store_true", help="the -v listing as JSON")
    parser.add_argument("--hook", metavar="HOOK", help="only plugins implementing this hook (e.g. prx_loss_terms)")
    return parser


def _print_plugin_reports(reports: list[Any]) -> None:
    for report in reports:
        where = "core, always active" if report.kind == "core" else "active when a recipe names it"
        print(f"{report.name}  {report.distribution} {report.version}  ({report.module}; {where})")
        if report.error:
            print(f"    cannot be loaded: {report.error}")
            continue
        rows = [
            ("summary", report.summary),
            ("spec", report.spec),
            ("paper", report.paper),
            ("entries", ", ".join(report.entries)),
            ("hooks", ", ".join(report.hooks)),
            ("requires", ", ".join(report.requires)),
            ("conflicts", ", ".join(report.conflicts)),
            ("settings", ", ".join(f"{k} = {v!r}" for k, v in report.config.items())),
        ]
        for label, value in rows:
            if value:
                print(f"    {label + ':':<10} {value}")


def _entry_hooks(report: Any) -> set[str]:
    """The registry hooks behind a plugin's slot entries (``--hook prx_register_optimizers``)."""
    from prx_core.registry import SLOTS

    return {SLOTS[entry.split(":")[0]] for entry in report.entries}


def cmd_plugins(argv: list[str] | None = None) -> int:
    from prx_core import __version__
    from prx_core.plugins import activate, installed_plugins

    args = plugins_parser().parse_args(argv or [])
    if args.verbose or args.json or args.hook:
        import json

        from prx_core import hookspecs
        from prx_core.plugin_report import plugin_reports

        known_hooks = sorted(name for name in vars(hookspecs) if name.startswith("prx_"))
        if args.hook and args.hook not in known_hooks:
            from prx_core.config import suggest

            print(
                f"prx-run plugins: unknown hook {args.hook!r}{suggest(args.hook, known_hooks)} "
                f"(hooks: {', '.join(known_hooks)})",
                file=sys.stderr,
            )
            return 2

        reports = [r for r in plugin_reports() if not args.hook or args.hook in r.hooks or args.hook in _entry_hooks(r)]
        if args.json:
            print(json.dumps({"prx_core": __version__, "plugins": [r.as_dict() for r in reports]}, indent=2))
        else:
            print(f"prx-core {__version__}\n")
            _print_plugin_reports(reports)
        return 0

    print(f"prx-core {__version__}")
    print("\ncore plugins (always active):")
    # Registering builtins is cheap: their factories import torch only when a run builds them.
    active = activate({}, [])
    for name in sorted(active.builtin):
        info = active.infos[name]
        entries = [f"{slot}:{e.name}" for slot, reg in active.registries.items() for e in reg if e.plugin == name]
        print(f"  {name:<18} {__version__:<9} {info.summary}  [{info.spec}]")
        print(f"  {'':<18} provides {', '.join(entries)}")
    installed = installed_plugins()
    print("\ninstalled plugins (active only when a recipe names them):")
    if not installed:
        print("  none")
    for name, plugin in sorted(installed.items()):
        print(f"  {name:<18} {plugin.version:<9} {plugin.distribution} ({plugin.module})")
    return 0


def _recipe_files(paths: list[str]) -> list[Path | str]:
    from prx_core.recipe_sources import is_remote

    files: list[Path | str] = []
    for ref in paths:
        if is_remote(ref):
            files.append(ref)
        elif Path(ref).is_dir():
            files.extend(sorted(Path(ref).rglob("*.toml")))
        else:
            files.append(Path(ref))
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
        extra += f"; metrics: {', '.join(recipe.metrics)}" if recipe.metrics else ""
        if recipe.model.init:
            from prx_core.finetune import init_status

            extra += f"; init: {init_status(recipe.model)}"
        if args.memory and recipe.train.device == "cuda":
            from prx_core.memory import HEADROOM_GIB, estimate_recipe

            estimate = estimate_recipe(recipe, world_size=args.gpus)
            if not estimate.fits(args.gpu_gb):
                failures += 1
                print(
                    f"FAIL {path}\n     estimated peak memory {estimate.summary()} exceeds {args.gpu_gb:g} GB "
                    f"less {HEADROOM_GIB:g} GiB headroom; turn on train.activation_checkpointing or lower "
                    "train.micro_batch (gradient accumulation keeps the global batch)",
                    file=sys.stderr,
                )
                continue
            extra += f"; memory {estimate.summary()}"
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
    from prx_core.errors import TrainingError
    from prx_core.runlock import release_all
    from prx_core.trainer import Trainer

    run_dir = args.run_dir or Path("runs") / recipe.name
    started = time.perf_counter()
    finished = False
    trainer: Trainer | None = None
    try:
        if recipe.stages:
            from prx_core.stages import run_stages

            staged = run_stages(recipe, run_dir, args.resume, args.allow_drift, sys.argv)
            trainer, result, output_dir = staged.trainer, staged.fit, staged.stage_dir
            del staged
        else:
            trainer = Trainer(recipe, run_dir, resume=args.resume, allow_drift=args.allow_drift, command=sys.argv)
            trainer.setup()
            result = trainer.fit()
            output_dir = run_dir
        is_main = trainer.dist.is_main
        finished = True
    except (TrainingError, RecipeError) as err:
        print(f"prx-run: {err}", file=sys.stderr)
        return 1
    finally:
        # Drop the trainer, so shutdown() frees its DDP/FSDP wrappers before leaving the group.
        trainer = None
        release_all()  # the run directory's lock, also after an error
        shutdown(finished)
    if not is_main:
        return 0
    minutes = (time.perf_counter() - started) / 60
    state = "stopped early at" if result.stopped_early else "finished"
    print(f"\n{recipe.name}: {state} step {result.step} in {minutes:.1f} min, final loss {result.final_loss:.4f}")
    print(f"run directory: {run_dir}")
    if output_dir != run_dir:
        print(f"  {'stages':<17} {run_dir / 'stages.json'} (last stage: {output_dir})")
    run_dir = output_dir
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


def _run_parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"prx-run {command}", description=description)
    parser.add_argument("run_dir", type=Path, help="a run directory written by prx-run")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the newest valid one)")
    return parser


def _open_run(command: str, run_dir: Path, checkpoint: Path | None) -> Trainer | None:
    """A trainer restored from a run directory's resolved recipe and a checkpoint; None (after
    printing why, as ``prx-run <command>: ...``) when that fails."""
    from prx_core.errors import TrainingError
    from prx_core.recipe import load
    from prx_core.trainer import Trainer

    try:
        recipe_file = run_dir / "recipe.toml"
        if not recipe_file.is_file():
            raise RecipeError(f"{run_dir} is not a run directory: {recipe_file} is missing")
        trainer = Trainer(load(recipe_file), run_dir, resume=str(checkpoint or run_dir))
        trainer.setup()
    except (RecipeError, TrainingError, RuntimeError) as err:
        print(f"prx-run {command}: {err}", file=sys.stderr)
        return None
    return trainer


def sample_parser() -> argparse.ArgumentParser:
    parser = _run_parser("sample", "Generate images from a trained run.")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the recipe's sampling.steps)")
    parser.add_argument("--cfg", type=float, help="guidance scale (default: the recipe's sampling.cfg)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the recipe's sampling.seed)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: the training size)")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/samples/cli)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def eval_parser() -> argparse.ArgumentParser:
    parser = _run_parser("eval", "Compute the recipe's evaluation on a checkpoint.")
    parser.add_argument(
        "--repeat",
        type=_positive_int,
        default=1,
        metavar="K",
        help="evaluate the same weights K times, under the evaluation seeds eval.seed, eval.seed + 1, ...; "
        "writes each result and each key's mean, std and min-max over the K evaluations to RUN_DIR/eval/ (1)",
    )
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = _run_parser("export", "Write the denoiser as a diffusers folder (OUT/transformer).")
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument(
        "--weights",
        choices=("sampling", "trained"),
        default="sampling",
        help="'sampling': the weights samples are made with (EMA when on); 'trained': the raw weights",
    )
    return parser


def cmd_sample(argv: list[str]) -> int:
    args = sample_parser().parse_args(argv)
    _setup_logging(quiet=True)
    from prx_core.images import save_grid

    trainer = _open_run("sample", args.run_dir, args.checkpoint)
    if trainer is None:
        return 1
    sampling = trainer.recipe.sampling
    size = args.size or trainer.sample_size()
    images = trainer.generate(
        args.prompt,
        args.steps or sampling.steps,
        sampling.cfg if args.cfg is None else args.cfg,
        sampling.seed if args.seed is None else args.seed,
        size,
    )
    out = args.out or args.run_dir / "samples" / "cli"
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, prompt) in enumerate(zip(images, args.prompt, strict=True)):
        path = save_grid(image[None], out / f"sample_{i:03d}.png", pad=0, min_tile=1)
        print(f"{path}\t{prompt}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    args = eval_parser().parse_args(argv)
    _setup_logging(quiet=True)
    import json

    trainer = _open_run("eval", args.run_dir, args.checkpoint)
    if trainer is None:
        return 1
    if args.repeat > 1:
        return _eval_repeated(trainer, args.run_dir, args.repeat)
    results = trainer.evaluate()
    out = args.run_dir / "eval" / f"step_{trainer.step:08d}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"step": trainer.step, **results}, indent=2) + "\n", encoding="utf-8")
    for key, value in results.items():
        print(f"{key}\t{value:.6g}")
    print(f"written to {out}")
    return 0


def eval_spread(repeats: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key: mean, sample std (n − 1) and min / max over the repeated evaluations that report it."""
    import statistics

    keys = sorted({key for results in repeats for key in results})
    spread = {}
    for key in keys:
        values = [results[key] for results in repeats if key in results]
        spread[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return spread


def _eval_repeated(trainer: Trainer, run_dir: Path, repeat: int) -> int:
    """``prx-run eval --repeat K``: the same weights under K evaluation seeds. The spread is the
    evaluation's own noise (which held-out noise draws the images and the validation loss get),
    to set beside the seed-to-seed spread of a study."""
    import json

    from prx_core.evaluation import evaluate

    step, first = trainer.step, trainer.recipe.eval.seed
    seeds = [first + k for k in range(repeat)]
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    repeats: list[dict[str, float]] = []
    for seed in seeds:
        results = evaluate(trainer, seed=seed)
        repeats.append(results)
        path = out_dir / f"step_{step:08d}_seed{seed}.json"
        path.write_text(json.dumps({"step": step, "eval_seed": seed, **results}, indent=2) + "\n", encoding="utf-8")
        print(f"eval seed {seed}: written to {path}")
    spread = eval_spread(repeats)
    summary = {
        "step": step,
        "eval_seeds": seeds,
        "spread": spread,
        "repeats": [{"eval_seed": s, **r} for s, r in zip(seeds, repeats, strict=True)],
    }
    path = out_dir / f"step_{step:08d}_spread.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\n{repeat} evaluations of step {step} (eval seeds {seeds[0]}..{seeds[-1]}); std is the sample std")
    print("key\tmean\tstd\tmin\tmax")
    for key, stat in spread.items():
        print(f"{key}\t{stat['mean']:.6g}\t{stat['std']:.3g}\t{stat['min']:.6g}\t{stat['max']:.6g}")
    print(f"written to {path}")
    return 0


def cmd_export(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    _setup_logging(quiet=True)
    from prx_core.denoiser import export_diffusers

    trainer = _open_run("export", args.run_dir, args.checkpoint)
    if trainer is None:
        return 1
    modules = trainer.sampling_modules() if args.weights == "sampling" else trainer.run.require("trainable")
    path = export_diffusers(modules.model, args.out / "transformer")
    print(f"{path}: load with PRXTransformer2DModel.from_pretrained")
    missing = _write_pipeline(trainer, modules.model, args.out)
    if missing:
        print(f"no PRXPipeline folder: {missing}")
    else:
        print(f"{args.out}: load with PRXPipeline.from_pretrained")
    return 0


def _write_pipeline(trainer: Trainer, model: Any, out: Path) -> str | None:
    """Save a ``PRXPipeline`` to ``out`` when every component is a standard one.

    Returns None once written, else why not (naming the component that is not standard). The
    latent space and text encoder offer their components through the optional methods of
    :class:`prx_core.slots.PipelineLatentSpace` / :class:`~prx_core.slots.PipelineTextEncoder`.
    """
    from prx_core.slots import PipelineLatentSpace, PipelineTextEncoder

    slots, run = trainer.recipe.slots, trainer.run
    objective = slots["objective"].use
    if objective != "flow_matching":
        return f"objective '{objective}' is not the velocity (flow_matching) objective PRXPipeline samples with"
    latent_space = run.require("latent_space")
    vae = latent_space.pipeline_vae() if isinstance(latent_space, PipelineLatentSpace) else None
    if vae is None:
        return f"latent space '{slots['latent_space'].use}' is not a diffusers autoencoder PRXPipeline can load"
    # Core wraps the slot's encoder in a CachedTextEncoder; the plugin's object is inside.
    encoder = getattr(run.require("text_encoder"), "encoder", None)
    text = encoder.pipeline_text_components() if isinstance(encoder, PipelineTextEncoder) else None
    if text is None:
        return f"text encoder '{slots['text_encoder'].use}' is not a transformers encoder PRXPipeline can load"

    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline
    from diffusers.pipelines.prx.pipeline_prx import ASPECT_RATIO_BINS

    # Same shifted grid as training and prx-run sample: σ' = s·σ / (1 + (s − 1)·σ).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(run.require("objective").shift))
    size = trainer.sample_size()
    extra = {"default_sample_size": size} if size in ASPECT_RATIO_BINS else {}
    text_encoder, tokenizer = text
    pipeline = PRXPipeline(
        transformer=model, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, **extra
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    return None


#: Every ``prx-run <command>``: name -> (one-line summary for ``prx-run --help``, handler). The
#: handler is a function of this module or the name of a module in :mod:`prx_core.commands` with
#: ``main(argv) -> int``, imported only when its command is typed (so ``check`` stays torch-free).
#: Dispatch and ``--help`` both read this table: a new command is one row here, nothing else.
COMMAND_TABLE: dict[str, tuple[str, Callable[[list[str]], int] | str]] = {
    "check": ("validate recipes (files or folders) without building a model", cmd_check),
    "plugins": ("list core and installed plugins (-v: entries, hooks, settings)", cmd_plugins),
    "sample": ("generate images from a trained run's checkpoint", cmd_sample),
    "eval": ("compute the recipe's evaluation on a checkpoint (--repeat K: its spread)", cmd_eval),
    "export": ("write a run's denoiser as a diffusers folder (and a PRXPipeline when possible)", cmd_export),
    "precompute": ("encode a recipe's data into latent/caption shards to train from", "precompute"),
    "ablate": ("train several recipes over several seeds, resuming what is left", "ablate"),
    "report": ("compare runs grouped by recipe: tables, plots, differences with intervals", "report"),
    "new-plugin": ("write a plugin package skeleton that installs and passes its tests", "new_plugin"),
    "show": ("print a resolved recipe with the file (or --set) that set each key", "show"),
    "diff": ("print the resolved difference of two recipes or run directories, one key per line", "diff"),
}
#: ``prx-run <command>`` → module in :mod:`prx_core.commands` (the table's rows with a module name).
EXTERNAL_COMMANDS = {name: handler for name, (_, handler) in COMMAND_TABLE.items() if isinstance(handler, str)}


def commands_help() -> str:
    """The command list of ``prx-run --help``, one line per row of :data:`COMMAND_TABLE`."""
    rows = [("RECIPE", "train a recipe (the default; see the options above)")]
    rows += [(name, summary) for name, (summary, _) in COMMAND_TABLE.items()]
    width = max(len(name) for name, _ in rows)
    return "commands:\n" + "\n".join(f"  prx-run {name:<{width}}  {summary}" for name, summary in rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMAND_TABLE:
        handler = COMMAND_TABLE[argv[0]][1]
        if isinstance(handler, str):
            handler = importlib.import_module(f"prx_core.commands.{handler}").main
        return int(handler(argv[1:]))
    word = argv[0] if argv else ""
    if word[:1].isalpha() and word.replace("-", "").isalpha() and word.islower() and not Path(word).exists():
        # A bare lowercase word that is neither a command nor a file (a recipe reference has a
        # '.', '/' or ':'): most likely a mistyped command.
        print(
            f"prx-run: unknown command '{word}'{suggest(word, COMMAND_TABLE)} "
            "(a recipe is a .toml file; prx-run --help lists the commands)",
            file=sys.stderr,
        )
        return 2
    return cmd_train(argv)


if __name__ == "__main__":
    sys.exit(main())
