"""The training loop. Read it top to bottom: setup, then ``fit``, then the pieces ``fit`` calls.

Randomness inside a step comes from generators keyed by (seed, purpose, step, micro-step,
rank) (:mod:`prx_core.seeding`), and the data is a pure function of the step, so a resumed run
continues bitwise as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

import numpy as np
import torch

from prx_core.checkpoint import CheckpointError, CheckpointInfo, CheckpointManager, resolve_checkpoint
from prx_core.config import RecipeError
from prx_core.context import ForwardContext, RunContext, StepContext
from prx_core.denoiser import TrainableModules, build_model, compile_blocks, denoise, export_diffusers
from prx_core.distributed import (
    DenoiserForward,
    DistEnv,
    any_rank,
    barrier,
    full_state,
    gradient_sync,
    init_from_env,
    is_sharded,
    load_full_state,
    mean_across_ranks,
    reshard,
    total_grad_norm,
    wrap,
)
from prx_core.errors import TrainingError
from prx_core.flow import interpolate
from prx_core.hookspecs import LossTerm
from prx_core.images import save_grid
from prx_core.keys import Stash
from prx_core.recipe import Recipe
from prx_core.rundir import METRICS_FILE, environment, git_sha, truncate_metrics, write_atomic, write_run_files
from prx_core.runlock import LockHandle, acquire_on_rank0
from prx_core.sampling import euler_sample
from prx_core.schedules import lr_multiplier
from prx_core.seeding import derive_seed, device_rng_states, generator_for, restore_device_rng
from prx_core.slots import BatchRequest, EncodingsSource, Guidance
from prx_core.text_cache import CachedTextEncoder, token_counts
from prx_core.throughput import count_step_flops, peak_flops, peak_memory_gb, peak_memory_reserved_gb
from prx_core.towers import (
    DATA_DTYPE,
    LazyTower,
    batch_images,
    batch_latents,
    batch_text,
    batch_to_device,
    build_slot,
    build_tower,
    provides_encodings,
    setup_errors,
)
from prx_core.transfer import device_generator

logger = logging.getLogger("prx")

#: Recipe keys that may change between a checkpoint and its resume without --allow-drift.
DRIFT_EXEMPT = (
    "train.steps",
    "train.compile",  # the same maths, compiled or not
    "train.deterministic",  # the same maths, in a fixed summation order
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "description",
    "reference",  # a label for reports; it changes nothing a run computes
)

#: Version of the checkpoint payload ``Trainer.save`` writes: its parts and the keys inside them.
#: A change to either bumps it and adds the converter from the previous version to
#: :data:`PAYLOAD_UPGRADES`, so a checkpoint written by an older prx still resumes
#: (``tests/fixtures/checkpoint_v1`` holds a version-1 checkpoint that must keep resuming bitwise).
PAYLOAD_VERSION = 2
#: ``version -> convert(parts, meta) -> (parts, meta)`` of ``version + 1``.
PAYLOAD_UPGRADES: dict[int, Callable[[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]] = {}


def _v1_to_v2(parts: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Version 2 adds ``trainer.log_window``, the sums of the metrics row in progress. A version-1
    checkpoint did not record them: it resumes with an empty window, so its first logged row
    averages only the steps after the resume, as version 1 did."""
    trainer = {**parts["trainer"], "log_window": MetricWindow().state_dict(None)}
    return {**parts, "trainer": trainer}, meta


PAYLOAD_UPGRADES[1] = _v1_to_v2
#: The parts every payload version so far holds.
PAYLOAD_PARTS = ("trainable", "optimizer", "scheduler", "trainer", "plugins")


@dataclass(frozen=True)
class FitResult:
    step: int
    final_loss: float
    run_dir: Path
    stopped_early: bool


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def enable_deterministic() -> None:
    """Deterministic CUDA kernels (``train.deterministic``): an op with none raises instead of
    running a non-deterministic one. cuBLAS needs a fixed workspace for that, set before its first
    use, and cuDNN must not pick kernels by timing."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    logger.info("train.deterministic: deterministic algorithms only (slower on CUDA)")


def batch_layout(global_batch: int, micro_batch: int | None, world_size: int) -> tuple[int, int]:
    """(micro_batch, accumulation) such that micro_batch × accumulation × world_size == global_batch."""
    micro = micro_batch if micro_batch is not None else global_batch // world_size
    if micro < 1 or global_batch % (micro * world_size):
        raise RecipeError(
            f"train.global_batch {global_batch} is not divisible by micro_batch {micro} × world size {world_size}"
        )
    return micro, global_batch // (micro * world_size)


def flatten_dict(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_drift(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, except those that may change on resume.

    The saved recipe is first resolved again by the running code (:func:`resolve_saved_recipe`),
    so a key that a newer prx added, at its default, is not drift: upgrading prx alone never
    blocks a resume.
    """
    a, b = flatten_dict(resolve_saved_recipe(saved)), flatten_dict(current)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in DRIFT_EXEMPT)


def resolve_saved_recipe(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's resolved recipe as the running code resolves it (new keys at their defaults).

    A recipe the running code no longer accepts (a plugin since uninstalled, a key since removed)
    is compared as it was saved, so the drift report names what changed.
    """
    from prx_core.recipe import RawRecipe, validate

    try:
        return validate(RawRecipe(json.loads(json.dumps(saved)), {}, None)).resolved()
    except (RecipeError, RuntimeError):
        return saved


def upgrade_payload(parts: dict[str, Any], meta: dict[str, Any], where: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's ``(parts, meta)`` converted to :data:`PAYLOAD_VERSION`, or a clear refusal."""
    version = meta.get("payload_version", 1)
    if not isinstance(version, int) or version < 1:
        raise TrainingError(f"checkpoint {where} has an invalid payload_version {version!r}")
    if version > PAYLOAD_VERSION:
        raise TrainingError(
            f"checkpoint {where} was written by a newer prx (payload version {version}; this prx-core reads "
            f"versions up to {PAYLOAD_VERSION}); upgrade prx-core to resume it"
        )
    while version < PAYLOAD_VERSION:
        convert = PAYLOAD_UPGRADES.get(version)
        if convert is None:
            raise TrainingError(f"checkpoint {where}: no converter from payload version {version} to {version + 1}")
        parts, meta = convert(parts, meta)
        logger.info("checkpoint %s: payload converted from version %d to %d", where, version, version + 1)
        version += 1
    missing = [name for name in PAYLOAD_PARTS if name not in parts]
    if missing:
        raise TrainingError(
            f"checkpoint {where} lacks part(s) {', '.join(missing)} of payload version {PAYLOAD_VERSION} "
            "(a format change without a version bump and converter?)"
        )
    return parts, {**meta, "payload_version": PAYLOAD_VERSION}


def _numpy_rng_state() -> dict[str, Any]:
    state: Any = np.random.get_state(legacy=True)
    _, keys, pos, has_gauss, cached = state
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "rest": [int(pos), int(has_gauss), float(cached)],
    }


class SpikeDetector:
    """Flags a logged loss far above the running mean of earlier logged losses."""

    def __init__(self, factor: float = 3.0, decay: float = 0.9, warmup: int = 5) -> None:
        self.factor, self.decay, self.warmup = factor, decay, warmup
        self.mean = math.nan
        self.previous_mean = math.nan
        self.seen = 0
        self.count = 0

    def update(self, loss: float) -> bool:
        self.previous_mean = self.mean
        spike = self.seen >= self.warmup and loss > self.factor * self.mean
        self.count += int(spike)
        if not spike:  # a spike must not raise the bar for the next one
            self.mean = loss if self.seen == 0 else self.decay * self.mean + (1 - self.decay) * loss
            self.seen += 1
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "seen": self.seen, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.seen, self.count = float(state["mean"]), int(state["seen"]), int(state["count"])


class MetricWindow:
    """The running sums behind the next row of metrics.jsonl: loss and loss terms since the last
    logged step.

    Saved in every checkpoint, so a run resumed at step 42 with ``log_every = 25`` logs at step 50
    the mean over steps 26–50, as the run without the interruption does. The saved sums are the
    means over ranks (the logged value is the mean over ranks of each rank's sum, and a mean is
    linear), so every rank restores the same numbers.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss_sum = torch.zeros(())
        self.term_sums: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """One optimizer step's loss and unweighted loss terms (no host sync: device tensors stay there)."""
        self.steps += 1
        self.loss_sum = self.loss_sum.to(loss.device) + loss
        for name, value in terms.items():
            previous = self.term_sums.get(name)
            self.term_sums[name] = (torch.zeros_like(loss) if previous is None else previous.to(loss.device)) + value

    def means(self, dist: DistEnv) -> dict[str, float]:
        """``loss`` and ``loss/<term>``: the window's means over steps and ranks (a collective)."""
        means = {"loss": mean_across_ranks(dist, self.loss_sum).item() / self.steps}
        for name, value in sorted(self.term_sums.items()):
            means[f"loss/{name}"] = mean_across_ranks(dist, value).item() / self.steps
        return means

    def state_dict(self, dist: DistEnv | None, device: torch.device | None = None) -> dict[str, Any]:
        """A collective when ``dist`` is active: every rank calls it, rank 0 saves the answer."""

        def reduced(value: torch.Tensor) -> float:
            if device is not None:
                value = value.to(device)  # NCCL reduces device tensors only
            return float(value.item() if dist is None else mean_across_ranks(dist, value).item())

        return {
            "steps": self.steps,
            "loss_sum": reduced(self.loss_sum),
            "term_sums": {name: reduced(value) for name, value in sorted(self.term_sums.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # float32, the dtype the sums accumulate in, so a resumed window adds up bit for bit.
        self.steps = int(state["steps"])
        self.loss_sum = torch.tensor(float(state["loss_sum"]), dtype=torch.float32)
        self.term_sums = {k: torch.tensor(float(v), dtype=torch.float32) for k, v in state["term_sums"].items()}


def _few(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", … (+{len(names) - limit})" if len(names) > limit else "")


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        resume: str | None = None,
        allow_drift: bool = False,
        command: list[str] | None = None,
        continue_from: tuple[CheckpointInfo, int] | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.resume = resume
        #: (checkpoint of the previous stage, its last step): weights to start a new stage from.
        self.continue_from = continue_from
        self.allow_drift = allow_drift
        self.command = command or []
        self.stop_requested = False
        self.tracker_failures = 0
        self.nonfinite_skipped = 0
        #: Seconds this rank spent inside ``data.batch`` since the last log step.
        self.data_wait_s = 0.0
        self.spikes = SpikeDetector()
        self.log_window = MetricWindow()
        self.step = 0
        #: Step of the last checkpoint started (None after a failed write), and failed writes so far.
        self.saved_step: int | None = None
        self.failed_saves = 0
        #: Directory whose lock this trainer holds (a staged run locks its top directory), and the hold.
        self.lock_dir = run_dir
        self.run_lock: LockHandle | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        recipe = self.recipe
        wanted = resolve_device(recipe.train.device)
        if recipe.train.deterministic:
            enable_deterministic()
        self.dist = init_from_env(wanted.type)
        device = torch.device("cuda", self.dist.local_rank) if wanted.type == "cuda" else wanted
        if not self.dist.is_main:
            logging.getLogger("prx").setLevel(logging.WARNING)  # one rank speaks
        # One writer per run directory: rank 0 locks it before choosing a checkpoint or writing.
        self.run_lock = acquire_on_rank0(self.lock_dir, self.dist, " ".join(self.command))
        if self.run_lock is not None:
            weakref.finalize(self, self.run_lock.release)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=recipe.train.keep_checkpoints)
        start_from = self._checkpoint_to_resume()
        if recipe.overrides:
            logger.info("recipe overrides (--set): %s", " ".join(recipe.overrides))
        barrier(self.dist)  # every rank decided before rank 0 writes into the run directory
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._attach_log_file()

        run = RunContext(
            recipe=recipe, device=device, run_dir=self.run_dir, rank=self.dist.rank, world_size=self.dist.world_size
        )
        self.run = run
        self.pm = recipe.active.manager
        # Precision first: every other builder asks it for dtypes.
        run.precision = self._build_slot("precision")
        warning = getattr(run.precision, "warning", None)
        if warning:  # e.g. bf16_weights: a deliberate ablation must never look like a normal run
            logger.warning("PRECISION POLICY '%s': %s", run.precision.name, warning)
        run.data = self._build_slot("data")
        # Training from precomputed encodings needs no tower for a step: they load on first use.
        towers_lazy = provides_encodings(run.data)
        run.latent_space = build_tower(recipe, run, "latent_space", lazy=towers_lazy)
        text_tower = build_tower(recipe, run, "text_encoder", lazy=towers_lazy)
        if towers_lazy and (recipe.train.sample_every or recipe.eval.every):
            # Grids or evaluations during training need both towers: load them now, before the
            # allocator has sized itself for training and hours before the first grid would.
            for tower in (run.latent_space, text_tower):
                if isinstance(tower, LazyTower):
                    tower.tower()
        run.text_encoder = CachedTextEncoder(text_tower)
        run.objective = self._build_slot("objective")
        run.router = self._build_slot("router") if "router" in recipe.slots else None
        run.tracker = self._build_slot("tracker")

        torch.manual_seed(recipe.seed)  # model init draws from the global generator
        model = build_model(recipe.model, run.text_encoder.dim, run.precision.param_dtype)
        if recipe.model.init and start_from is None and self.continue_from is None:
            # Fine-tuning: a fresh start only (a resume or a later stage loads its own checkpoint),
            # before plugins see the model, so EMA copies the initial weights and not random ones.
            from prx_core.finetune import load_init_weights

            with setup_errors("cannot load model.init"):
                load_init_weights(model, recipe.model)
        run.trainable = TrainableModules(model)
        with setup_errors("a plugin failed to set up (prx_configure / prx_build_modules)"):
            self.pm.hook.prx_configure(run=run)
            extras = self._build_extra_modules()
        # Device only: dtypes are the policy's business, and the guard below must see any deviation.
        run.trainable = TrainableModules(model, extras).to(device=device)
        # The optimizer is built after sharding, so FSDP2 hands it the sharded parameters.
        self.forward_module = DenoiserForward(run.trainable, self._forward)
        compute_dtype = getattr(run.precision, "compute_dtype", None)  # FSDP2 all-gathers weights in it
        self.wrapped = wrap(self.forward_module, self.dist, recipe.train.parallel, device, compute_dtype)
        if recipe.train.compile == "blocks":
            # After wrapping: FSDP2 shards each block first, and its hooks then run around the
            # compiled forward. Parameter names are unchanged, so checkpoints are too.
            compile_blocks(run.trainable.model)
        self.optimizer = self._build_slot("optimizer")
        schedule = recipe.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_multiplier(s, schedule.warmup_steps, recipe.train.steps, schedule.kind, schedule.min_lr_ratio),
        )
        self.micro_batch, self.accumulation = batch_layout(
            recipe.train.global_batch, recipe.train.micro_batch, run.world_size
        )
        self.empty_prompt = cast("EncodingsSource", run.data).empty_text() if towers_lazy else run.text_encoder.empty()
        self.empty_length = token_counts(self.empty_prompt[1])[0]  # read once, so steps never need to
        #: Text is cut to the batch's longest caption rounded up to this ([text_encoder] pad_multiple; 0: never).
        self.pad_multiple = int(getattr(recipe.slot_config("text_encoder"), "pad_multiple", 0))
        with setup_errors("a plugin failed before training (prx_before_training)"):
            self.pm.hook.prx_before_training(run=run)
        if start_from is not None:
            self._load(start_from)
        else:
            if self.continue_from is not None:
                self._continue_stage(*self.continue_from)
            if self.dist.is_main:
                write_run_files(self.run_dir, recipe, self.command)
                # A fresh start (e.g. --resume auto where no checkpoint was ever committed) must not
                # append to the metrics of the attempt that left nothing to resume from.
                truncate_metrics(self.run_dir / METRICS_FILE, self.step)
        run.precision.check(run.trainable, self.optimizer, "after resume" if start_from else "at start")
        n_params = sum(p.numel() for p in run.trainable.parameters())
        logger.info(
            "run '%s' on %s: %.2fM trainable parameters, global batch %d = %d × %d accumulation × %d process(es) "
            "(%s), precision %s, plugins %s",
            recipe.name,
            device,
            n_params / 1e6,
            recipe.train.global_batch,
            self.micro_batch,
            self.accumulation,
            run.world_size,
            recipe.train.parallel if run.world_size > 1 else "single process",
            run.precision.name,
            ", ".join(f"{k} {v}" for k, v in recipe.active.versions_table().items()),
        )

    def _build_extra_modules(self) -> dict[str, torch.nn.Module]:
        """Each plugin's ``prx_build_modules``, seeded from (seed, plugin) so init is order-free."""
        extras: dict[str, torch.nn.Module] = {}
        for impl in self.pm.hook.prx_build_modules.get_hookimpls():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.recipe.seed, "build_modules", impl.plugin_name))
                contribution = cast("Mapping[str, torch.nn.Module] | None", impl.function(run=self.run))
            for name, module in (contribution or {}).items():
                if name in extras:
                    raise TrainingError(f"two plugins build an extra module named '{name}'")
                extras[name] = module
        return extras

    def _build_slot(self, slot: str) -> Any:
        return build_slot(self.recipe, self.run, slot)

    def _attach_log_file(self) -> None:
        path = (self.run_dir / "train.log").resolve()
        root = logging.getLogger("prx")
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
            handler = logging.FileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
            self._log_handler = handler

    def _checkpoint_to_resume(self) -> CheckpointInfo | None:
        """The checkpoint to resume, hashed once, by rank 0 only; the other ranks get its answer.

        Verifying reads every byte of a checkpoint of ~15 GB: one rank does it, once (``_load``
        does not verify again), instead of every rank twice.
        """
        if not self.dist.active:
            return self._choose_checkpoint()
        answer: list[Any] = [None]
        if self.dist.is_main:
            try:
                info = self._choose_checkpoint()
                answer = [("ok", str(info.path), info.step) if info else ("ok", None, 0)]
            except (TrainingError, CheckpointError) as err:
                answer = [("error", str(err), 0)]
        torch.distributed.broadcast_object_list(answer, src=0)
        status, value, step = answer[0]
        if status == "error":
            raise TrainingError(value)
        return CheckpointInfo(path=Path(value), step=step) if value is not None else None

    def _choose_checkpoint(self) -> CheckpointInfo | None:
        existing = self.checkpoints.committed()
        if self.resume is None:
            if existing:
                raise TrainingError(
                    f"run directory {self.run_dir} already holds checkpoints (newest: step {existing[-1].step}); "
                    "pass --resume auto to continue it, or --run-dir to start a new run"
                )
            return None
        if self.resume == "auto":
            info = self.checkpoints.latest_valid()
            if info is None:
                logger.info("--resume auto: no checkpoint in %s, starting from scratch", self.run_dir)
            return info
        return resolve_checkpoint(Path(self.resume))

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        recipe, run, main = self.recipe, self.run, self.dist.is_main
        train = recipe.train
        if recipe.metrics and (recipe.eval.every or recipe.eval.at_end) and self.step < train.steps:
            # Before the first step, not at setup (``prx-run sample`` / ``export`` need no metric
            # networks): missing metric weights fail a run now, not at its first evaluation.
            from prx_core.evaluation import metric_objects

            with setup_errors("cannot build the evaluation metrics"):
                metric_objects(self)
        tracker = run.require("tracker")
        if main:
            hparams = {
                "name": recipe.name,
                "recipe": recipe.resolved(),
                "plugins": recipe.active.versions_table(),
                "git_sha": git_sha() or "",
                "environment": environment(),
                "precision_warning": getattr(run.precision, "warning", None) or "",
            }
            self._track(tracker.start, hparams, train.steps, self.step)
        step_flops = self._count_step_flops() if train.count_flops and self.step < train.steps else None
        device_peak = peak_flops(run.device, train.peak_tflops)
        # The loss means cover the whole log window, restored from the checkpoint on a resume;
        # the rates cover the steps this process timed (window_steps since window_start).
        window = self.log_window
        window_steps, window_start = 0, time.perf_counter()
        self.data_wait_s = 0.0
        last_loss = math.nan
        with self._graceful_stop(), self._metrics_file() as metrics_file:
            while self.step < train.steps:
                # All ranks agree before anyone stops: a signal may have reached only one of them.
                if any_rank(self.dist, self.stop_requested):
                    self.stop_requested = True
                    break
                loss, terms, grad_norm = self.train_step(self.step)
                self.step += 1
                window.add(loss, terms)
                window_steps += 1
                if self.step % train.log_every == 0 or self.step == train.steps:
                    elapsed = time.perf_counter() - window_start
                    means = window.means(self.dist)
                    metrics: dict[str, float] = {
                        "loss": means.pop("loss"),
                        "grad_norm": grad_norm.item(),
                        "lr": float(self.scheduler.get_last_lr()[0]),
                        **self._group_learning_rates(),
                        "steps_per_s": window_steps / elapsed,
                        "images_per_s": window_steps * train.global_batch / elapsed,
                        **means,  # loss/<term>
                        "batches_per_s": window_steps / elapsed,
                        # Above a few percent, the data source (not the model) limits the speed.
                        "data_wait_fraction": self.data_wait_s / elapsed,
                        "peak_mem_gb": peak_memory_gb(run.device),
                        "nonfinite_skipped": float(self.nonfinite_skipped),
                        "loss_spikes": float(self.spikes.count),
                    }
                    reserved = peak_memory_reserved_gb(run.device)
                    if reserved is not None:  # the allocator's cache on top of the allocated peak
                        metrics["peak_mem_reserved_gb"] = reserved
                    metrics.update(self._data_stats())
                    if step_flops is not None:
                        metrics["tflops_per_s_per_device"] = step_flops * metrics["steps_per_s"] / 1e12
                        if device_peak:
                            metrics["mfu"] = step_flops * metrics["steps_per_s"] / device_peak
                    if self.spikes.update(metrics["loss"]):
                        metrics["loss_spikes"] = float(self.spikes.count)
                        logger.warning(
                            "loss spike at step %d: %.4g is %.1f× the running mean %.4g",
                            self.step,
                            metrics["loss"],
                            metrics["loss"] / self.spikes.previous_mean,
                            self.spikes.previous_mean,
                        )
                    last_loss = metrics["loss"]
                    if metrics_file is not None:
                        metrics_file.write(json.dumps({"step": self.step, "time": time.time(), **metrics}) + "\n")
                        metrics_file.flush()
                        self._track(tracker.log_metrics, metrics, self.step)
                    window.reset()
                    window_steps, window_start = 0, time.perf_counter()
                    self.data_wait_s = 0.0
                if train.sample_every and self.step % train.sample_every == 0 and self.step < train.steps:
                    self.write_samples(self.step)
                if recipe.eval.every and self.step % recipe.eval.every == 0 and self.step < train.steps:
                    self.evaluate_and_log(self.step)
                if self.step % train.checkpoint_every == 0 or self.step == train.steps:
                    self.save(background=True)
            if self.stop_requested and self.step < train.steps:
                logger.warning("stop requested: saving step %d and exiting; resume with --resume auto", self.step)
                if any_rank(self.dist, self.saved_step != self.step):
                    self.save(background=True)
        bad_data = {k: v for k, v in self._data_stats().items() if v}
        if bad_data and main:
            logger.info("data: %s", " ".join(f"{k}={v:g}" for k, v in sorted(bad_data.items())))
        if self.step >= train.steps:
            self.write_samples(self.step)
            if recipe.eval.at_end:
                self.evaluate_and_log(self.step)
            self._export()
        if main:
            self._track(tracker.close)
        if self.tracker_failures:
            logger.warning("the tracker failed %d time(s); metrics.jsonl has the full record", self.tracker_failures)
        # The write overlapped the final grid, evaluation and export. Every rank returns once it is
        # committed (or learns that it failed), so what follows may read the checkpoint.
        failure: TrainingError | None = None
        try:
            self._finish_checkpoint(last=True)
        except TrainingError as err:
            failure = err
        if any_rank(self.dist, failure is not None):
            raise failure or TrainingError("rank 0 could not write the last checkpoint (see its log)")
        if self.run_lock is not None:
            self.run_lock.release()  # everything is written; a SIGTERM's save-and-exit ends here too
        return FitResult(self.step, last_loss, self.run_dir, self.step < train.steps)

    def _count_step_flops(self) -> int:
        """FLOPs per optimizer step on this rank, counted once on a real micro-step."""
        self.run.require("trainable").train()
        flops = count_step_flops(lambda: self.micro_step(self.step, 0)[0])
        self.optimizer.zero_grad(set_to_none=True)
        logger.info("counted %.3g FLOPs per optimizer step per device (forward + backward)", flops * self.accumulation)
        return flops * self.accumulation

    @contextmanager
    def _metrics_file(self) -> Iterator[Any]:
        """metrics.jsonl, appended line by line (rank 0 only; other ranks get None)."""
        if not self.dist.is_main:
            yield None
            return
        with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            yield handle

    def _data_stats(self) -> dict[str, float]:
        """The data source's bad-data counters (``stats()``, optional), summed over ranks.

        Every rank reads a different shard of the data, so each sees different bad files; the sum
        is the run's count. Ratios are recomputed by the source and averaged (equal shares).
        """
        stats = getattr(self.run.require("data"), "stats", None)
        local = dict(stats()) if stats is not None else {}
        local.update(self.run.require("text_encoder").stats())
        if not self.dist.active:
            return local
        # Ranks meet different bad files, so their counters can differ in keys (or be empty): agree
        # on the union first, or the all-reduce would pair tensors of different lengths.
        key_sets: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(key_sets, sorted(local))
        keys = sorted({k for ks in key_sets for k in ks})
        if not keys:
            return {}
        values = torch.tensor([local.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.run.device)
        summed = mean_across_ranks(self.dist, values) * self.dist.world_size
        return {
            k: float(v) / (self.dist.world_size if "ratio" in k else 1)
            for k, v in zip(keys, summed.tolist(), strict=True)
        }

    def _group_learning_rates(self) -> dict[str, float]:
        """``lr/<group>`` per optimizer parameter group (groups may carry a ``name``)."""
        return {f"lr/{group.get('name', i)}": float(group["lr"]) for i, group in enumerate(self.optimizer.param_groups)}

    def train_step(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over ``accumulation`` micro-batches. Returns detached tensors.

        Loss, loss terms and gradient norm stay on the device; ``fit`` reads them (``.item()``)
        only at log steps. The one host sync per optimizer step is the finiteness check of the
        loss and gradient norm: ``train.nonfinite`` ("halt" or "skip" with weights, optimizer
        state and EMA untouched) must be decided before the optimizer and the after-step hooks
        run, and no optimizer-agnostic device-side skip exists. It costs the launch latency of
        clipping and the optimizer step once per step (the GPU idles while the host launches
        them), not a pipeline stall per micro-step.
        """
        run = self.run
        trainable = run.require("trainable")
        if not trainable.training:  # walking ~300 modules every step is measurable host time
            trainable.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = torch.zeros((), device=run.device)
        term_totals: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            with gradient_sync(self.wrapped, enabled=micro == self.accumulation - 1):
                loss, terms = self.micro_step(step, micro)
                (loss / self.accumulation).backward()
            loss_total += loss.detach() / self.accumulation
            for name, value in terms.items():
                term_totals[name] = term_totals.get(name, torch.zeros_like(loss_total)) + value / self.accumulation
        params = [p for p in trainable.parameters() if p.grad is not None]
        grad_norm = total_grad_norm(params)
        if not bool(torch.isfinite(grad_norm) & torch.isfinite(loss_total)):
            self._nonfinite(step, loss_total, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()  # the schedule follows the step count, skipped or not
            return loss_total.nan_to_num(0.0), term_totals, grad_norm.nan_to_num(0.0)
        clip = self.recipe.train.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.pm.hook.prx_after_optimizer_step(run=run, step=step + 1)
        return loss_total, term_totals, grad_norm.detach()

    def _nonfinite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        message = f"non-finite loss ({loss.item()}) or gradient norm ({grad_norm.item()}) at step {step + 1}"
        if self.recipe.train.nonfinite == "halt":
            raise TrainingError(
                f"{message}; stopped before the optimizer step, weights untouched (set train.nonfinite = 'skip' "
                "to skip such steps instead)"
            )
        self.nonfinite_skipped += 1
        logger.warning(
            "%s; skipped (%d so far): weights, optimizer state and EMA unchanged", message, self.nonfinite_skipped
        )

    def _forward(
        self,
        trainable: TrainableModules,
        x_t_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        text_BLD: torch.Tensor,
        mask_BL: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """The training forward (what DDP/FSDP wrap)."""
        run = self.run
        return denoise(
            trainable.model,
            x_t_BCHW,
            t_B,
            text_BLD,
            mask_BL,
            ctx,
            router=run.router,
            captures=run.captures,
            conditioning=run.conditioning_seams(),
            activation_checkpointing=self.recipe.train.activation_checkpointing,
        )

    def micro_step(self, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        run, recipe = self.run, self.recipe
        objective = run.require("objective")
        precision = run.require("precision")
        request = BatchRequest(
            step=step,
            micro_step=micro,
            accumulation=self.accumulation,
            rank=run.rank,
            world_size=run.world_size,
            size=self.micro_batch,
            seed=recipe.seed,
        )
        started = time.perf_counter()
        raw = run.require("data").batch(request)
        self.data_wait_s += time.perf_counter() - started
        generator = generator_for(recipe.seed, "step", step, micro, run.rank)
        # The batch's one copy (uint8 pixels stay uint8 until there; stored text cut to its longest row).
        raw, stored_lengths = batch_to_device(raw, run.device, self.pad_multiple, self.empty_length)
        images_BCHW = batch_images(raw, run.device)
        eps_draws = device_generator(recipe.seed, "latent_noise", step, micro, run.rank, device=run.device)
        x0_BCHW = batch_latents(raw, run, generator, images_BCHW, device_draws=eps_draws)
        batch = x0_BCHW.shape[0]
        # Caption dropout is decided on the host, in the CPU stream's order: the flags never go to the
        # device (dropped captions are encoded as "", a cache hit), and the host then knows every row's
        # length, to trim the text and to drop the attention mask when nothing is padded.
        dropped = (torch.rand(batch, generator=generator) < objective.caption_dropout).tolist()
        empty = (*self.empty_prompt, self.empty_length)
        text_BLD, mask_BL, padded = batch_text(raw, run, dropped, empty, self.pad_multiple, stored_lengths)
        # On an accelerator t and ε are drawn there (no copy); on a CPU from the step generator, as always.
        draws = device_generator(recipe.seed, "timesteps", step, micro, run.rank, device=run.device)
        t_B = objective.sample_timesteps(batch, draws or generator, run.device)
        noise_BCHW = self._noise(x0_BCHW, generator, step, micro)
        x_t_BCHW = interpolate(x0_BCHW, noise_BCHW, t_B)
        stash = Stash()
        ctx = StepContext(
            run=run,
            step=step,
            micro_step=micro,
            images_BCHW=images_BCHW,
            x0_BCHW=x0_BCHW,
            noise_BCHW=noise_BCHW,
            t_B=t_B,
            x_t_BCHW=x_t_BCHW,
            text_BLD=text_BLD,
            mask_BL=mask_BL,
            stash=stash,
            generator=generator,
            precomputed={k: v.to(run.device) for k, v in (raw.features or {}).items()},
        )
        route_keys = (recipe.seed, "route", step, micro, run.rank)  # routes drawn where the tokens are
        route_generator = device_generator(*route_keys, device=run.device) or generator_for(*route_keys)
        trainable = run.require("trainable")
        forward = ForwardContext(stash=stash, generator=route_generator, training=True, extras=trainable.extras)
        with precision.autocast(run.device):
            # No padding, no mask: SDPA may then pick its flash kernel (ctx.mask_BL keeps the mask).
            prediction = self.wrapped(x_t_BCHW, t_B, text_BLD, mask_BL if padded else None, forward)
            ctx.prediction_BCHW = prediction
            loss = objective.loss(ctx, prediction).mean()
            terms = self._loss_terms(ctx)
        total = loss + sum((t.weight * t.value.float() for t in terms), torch.zeros((), device=run.device))
        return total, {t.name: t.value.detach().float() for t in terms}

    def _noise(self, x0_BCHW: torch.Tensor, generator: torch.Generator, step: int, micro: int) -> torch.Tensor:
        """The step's ε, keyed by (seed, step, micro-step, rank) whatever the device.

        On a GPU it is drawn there, from a device generator with its own key: drawn on the CPU, it
        would be copied from pageable memory every step, a copy that stalls the host behind the
        stream (at pixel 1024 that is hundreds of MB per step). On the CPU the step generator draws
        it, so CPU runs keep their numbers.
        """
        run = self.run
        draws = device_generator(self.recipe.seed, "noise", step, micro, run.rank, device=run.device)
        if draws is not None:
            return torch.randn(x0_BCHW.shape, generator=draws, dtype=x0_BCHW.dtype, device=run.device)
        return torch.randn(x0_BCHW.shape, generator=generator, dtype=x0_BCHW.dtype).to(run.device)

    def _loss_terms(self, ctx: StepContext) -> list[LossTerm]:
        terms: dict[str, LossTerm] = {}
        for contribution in self.pm.hook.prx_loss_terms(step=ctx):
            for term in contribution or []:
                if term.name in terms:
                    raise TrainingError(f"two plugins return a loss term named '{term.name}'")
                terms[term.name] = term
        # Summing in name order makes the total independent of plugin order, bit for bit.
        return [terms[name] for name in sorted(terms)]

    # ------------------------------------------------------------------ sampling

    def sampling_modules(self) -> TrainableModules:
        answers = [m for m in self.pm.hook.prx_sampling_model(run=self.run) if m is not None]
        if len(answers) > 1:
            raise TrainingError("more than one plugin provides sampling weights (prx_sampling_model)")
        return answers[0] if answers else self.run.require("trainable")

    def guidance(self) -> Guidance | None:
        answers = [g for g in self.pm.hook.prx_guidance(run=self.run) if g is not None]
        if len(answers) > 1:
            raise TrainingError("more than one plugin replaces classifier-free guidance (prx_guidance)")
        return answers[0] if answers else None

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        steps: int,
        cfg: float,
        seed: int,
        size: int,
        noise_indices: list[int] | None = None,
    ) -> torch.Tensor:
        """Images in [0, 1] for ``prompts``.

        Prompt i's noise depends only on (seed, noise_indices[i]) (default: i), so an image does not
        change with the batch it is generated in, and different items get different noise. A
        per-sample guidance (TREAD's self-guidance routes) is keyed on the same (seed, index).
        """
        indices = noise_indices if noise_indices is not None else list(range(len(prompts)))
        run = self.run
        latent = run.require("latent_space")
        objective = run.require("objective")
        modules = self.sampling_modules()
        was_training = modules.training
        modules.eval()
        side = size // latent.spatial_compression
        noise_BCHW = torch.stack(
            [torch.randn(latent.channels, side, side, generator=generator_for(seed, "sample", i)) for i in indices]
        ).to(run.device, DATA_DTYPE)  # the Euler integration runs in fp32 whatever the weights' dtype
        states, mask = run.require("text_encoder").encode(prompts)
        cond = (states.to(noise_BCHW.dtype), mask)
        uncond = (self.empty_prompt[0].to(noise_BCHW.dtype), self.empty_prompt[1])
        ctx = ForwardContext(stash=Stash(), generator=None, training=False, extras=modules.extras)

        def velocity(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            ctx.stash.clear()
            with run.require("precision").autocast(run.device):
                out = self.predict(modules, x, t, s, m, ctx)
            return objective.velocity(out.float(), x, t)

        guidance = self.guidance()  # a per-sample guidance is keyed on (seed, indices), like the noise
        x0 = euler_sample(velocity, noise_BCHW, cond, uncond, steps, cfg, objective.shift, guidance, indices, seed)
        modules.train(was_training)
        return latent.decode(x0).float().clamp(0, 1).cpu()

    def predict(
        self,
        modules: TrainableModules,
        x_t_BCHW: torch.Tensor,
        t_B: torch.Tensor,
        text_BLD: torch.Tensor,
        mask_BL: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """An evaluation forward of ``modules`` (the trained ones or the sampling copy, e.g. EMA)."""
        run = self.run
        if modules is run.trainable:
            # Through the (unwrapped) forward module: FSDP2's root hooks gather the embedders;
            # DDP's wrapper is bypassed, since evaluation forwards need no gradient sync.
            return self.forward_module(x_t_BCHW, t_B, text_BLD, mask_BL, ctx)
        conditioning = run.conditioning_seams()
        return denoise(
            modules.model, x_t_BCHW, t_B, text_BLD, mask_BL, ctx, router=run.router, conditioning=conditioning
        )

    def sample_size(self) -> int:
        """Image side for sample grids and evaluation: the data config's ``size``, else the data
        source's (``precomputed`` knows it from its index), else 256."""
        configured = getattr(self.recipe.slot_config("data"), "size", None)
        return int(configured or getattr(self.run.data, "size", None) or 256)

    def write_samples(self, step: int) -> Path | None:
        """A grid at the fixed prompts and seeds. Sharded weights need every rank in the forward."""
        if not (self.dist.is_main or is_sharded(self.run.require("trainable"))):
            return None
        sampling = self.recipe.sampling
        prompts = list(sampling.prompts) or self.run.require("data").held_out_captions(sampling.num_prompts)
        size = self.sample_size()
        images = self.generate(prompts, sampling.steps, sampling.cfg, sampling.seed, size)
        reshard(self.forward_module)
        if not self.dist.is_main:
            return None
        out_dir = self.run_dir / "samples"
        out_dir.mkdir(exist_ok=True)
        path = save_grid(images, out_dir / f"step_{step:08d}.png")
        write_atomic(out_dir / f"step_{step:08d}.txt", "".join(f"{i}: {p}\n" for i, p in enumerate(prompts)))
        self._track(self.run.require("tracker").log_image, "samples", str(path), step)
        return path

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """Validation loss per t bin and the recipe's metrics on held-out data (all ranks call it)."""
        from prx_core.evaluation import evaluate

        return evaluate(self)

    def evaluate_and_log(self, step: int) -> dict[str, float]:
        results = self.evaluate()
        if self.dist.is_main:
            with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "time": time.time(), **results}) + "\n")
            tracker = self.run.require("tracker")
            for key, value in results.items():
                # "eval/loss/t0.2-0.4" -> name "loss", context {"subset": "eval", "t_bin": "0.2-0.4"}
                parts = key.split("/")
                context = {"subset": "eval"}
                if parts[-1].startswith("t") and parts[1] == "loss":
                    context["t_bin"] = parts[-1][1:]
                    name = "loss"
                else:
                    name = "/".join(parts[1:])
                self._track(tracker.log_metrics, {name: value}, step, context)
            logger.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    # ------------------------------------------------------------------ checkpoints

    def plugin_states(self) -> dict[str, Any]:
        states: dict[str, Any] = {}
        for contribution in self.pm.hook.prx_checkpoint_state(run=self.run):
            for key, obj in (contribution or {}).items():
                if key in states:
                    raise TrainingError(f"two plugins save checkpoint state under '{key}'")
                states[key] = obj
        return states

    def save(self, background: bool = False) -> CheckpointInfo | None:
        """Full-state checkpoint, written by rank 0 (gathering sharded state is a collective).

        ``background`` (what ``fit`` uses): rank 0 copies the state to the CPU, then the writing,
        hashing, fsync and commit happen in a thread while every rank trains on; the next save,
        and the end of ``fit``, wait for it. A background save that fails (a full disk) is logged
        as an error and retried at the next save, the previous checkpoint intact; if the last
        save of a run fails, ``fit`` raises (see :meth:`_finish_checkpoint`).
        """
        model_state, optim_state = full_state(self.run.require("trainable"), self.optimizer)
        log_window = self.log_window.state_dict(self.dist, self.run.device)  # a collective too
        self.saved_step = self.step
        if not self.dist.is_main:
            barrier(self.dist)
            return None
        if background:
            self._finish_checkpoint(last=False)
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": device_rng_states(self.run.device),  # this rank's GPU only: resumable on fewer GPUs
            "python": random.getstate(),
            "numpy": _numpy_rng_state(),
        }
        parts = {
            "trainable": model_state,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "trainer": {
                "step": self.step,
                # Optimizer state is keyed by position; the names let a later stage map it by name.
                "param_names": self._optimizer_param_names(),
                "rng": rng,
                "data_fingerprint": self.run.require("data").fingerprint,
                "nonfinite_skipped": self.nonfinite_skipped,
                "spikes": self.spikes.state_dict(),
                "log_window": log_window,
            },
            "plugins": {k: v.state_dict() for k, v in sorted(self.plugin_states().items())},
        }
        meta = {
            "payload_version": PAYLOAD_VERSION,
            "step": self.step,
            "recipe": self.recipe.resolved(),
            "world_size": self.run.world_size,
        }
        info = self.checkpoints.save(self.step, parts, meta, background=background)
        self.saved_step = self.step  # a failure of the previous background write reset it
        if background:
            logger.info(
                "checkpoint step %d: state copied in %.2f s, writing in the background",
                self.step,
                self.checkpoints.blocking_seconds,
            )
        else:
            logger.info("saved checkpoint %s", info.path)
        barrier(self.dist)
        return info

    def _finish_checkpoint(self, last: bool) -> None:
        """Wait for the background checkpoint write. A failed write (ENOSPC, EIO, quota) left the
        previous checkpoint valid: logged, and retried by the next save; when no save follows
        (``last``), training cannot end without its checkpoint, so it is a :class:`TrainingError`."""
        try:
            written = self.checkpoints.wait()
            if written is not None:
                logger.info(
                    "saved checkpoint %s (committed %.1f s after its save began, written in the background)",
                    written.path,
                    self.checkpoints.write_seconds,
                )
        except OSError as err:
            self.failed_saves += 1
            self.saved_step = None
            committed = self.checkpoints.committed()
            kept = f"step {committed[-1].step} ({committed[-1].path})" if committed else "none"
            if last:
                raise TrainingError(
                    f"the last checkpoint could not be written: {err}. The newest valid checkpoint is {kept}; "
                    "free space and run again with --resume auto"
                ) from err
            logger.error(
                "checkpoint could not be written (%s); the newest valid checkpoint is %s. Training continues "
                "and the next save retries (%d failed so far)",
                err,
                kept,
                self.failed_saves,
            )
        except Exception as err:
            raise TrainingError(f"writing the checkpoint failed: {err}") from err

    def _changed_recipe_sources(self) -> str:
        """The recipe files whose sha256 differs from the ones run.json recorded, as one line."""
        from prx_core.recipe_sources import changed_sources

        try:
            recorded = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8")).get("recipe_sources")
        except (OSError, ValueError):
            return ""
        return "; ".join(changed_sources(recorded, self.recipe.sources)) if recorded else ""

    def _read_checkpoint(self, info: CheckpointInfo, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        parts, meta = self.checkpoints.load(info, device="cpu", verify=verify)
        return upgrade_payload(parts, meta, info.path)

    def _load(self, info: CheckpointInfo) -> None:
        parts, meta = self._read_checkpoint(info, verify=False)  # rank 0 verified it when choosing it
        drift = recipe_drift(meta.get("recipe", {}), self.recipe.resolved())
        saved_world = int(meta.get("world_size", self.run.world_size))
        if saved_world != self.run.world_size:
            drift.append(f"world size ({saved_world} -> {self.run.world_size})")
        saved_fp = parts["trainer"].get("data_fingerprint")
        if saved_fp != self.run.require("data").fingerprint:
            drift.append(f"data fingerprint ({saved_fp} -> {self.run.require('data').fingerprint})")
        changed = self._changed_recipe_sources()
        if changed and not drift:
            logger.info("recipe sources changed since the run started (%s); they resolve to the same recipe", changed)
        if drift:
            message = f"resuming {info.path} with a changed recipe: {', '.join(drift)}"
            if changed:
                message += f" (changed recipe sources: {changed})"
            if not self.allow_drift:
                raise TrainingError(message + "; pass --allow-drift to accept the change")
            logger.warning(message + " (accepted with --allow-drift)")
        load_full_state(self.run.require("trainable"), self.optimizer, parts["trainable"], parts["optimizer"])
        self.scheduler.load_state_dict(parts["scheduler"])
        states = self.plugin_states()
        for key, obj in states.items():
            if key not in parts["plugins"]:
                raise TrainingError(f"checkpoint {info.path} has no state for plugin key '{key}'")
            obj.load_state_dict(parts["plugins"][key])
        rng = parts["trainer"]["rng"]
        torch.set_rng_state(rng["torch"])
        restore_device_rng(list(rng["cuda"]), self.run.device)
        random.setstate(rng["python"])
        np.random.set_state(("MT19937", rng["numpy"]["keys"].numpy().astype(np.uint32), *rng["numpy"]["rest"]))
        self.step = int(parts["trainer"]["step"])
        self.nonfinite_skipped = int(parts["trainer"].get("nonfinite_skipped", 0))
        self.spikes.load_state_dict(parts["trainer"].get("spikes", self.spikes.state_dict()))
        self.log_window.load_state_dict(parts["trainer"]["log_window"])
        if self.dist.is_main:
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)
        logger.info("resumed from %s at step %d", info.path, self.step)

    def _optimizer_param_names(self) -> list[str]:
        names = {id(p): n for n, p in self.run.require("trainable").named_parameters()}
        return [names.get(id(p), "") for group in self.optimizer.param_groups for p in group["params"]]

    def _continue_stage(self, info: CheckpointInfo, first_step: int) -> None:
        """Start this stage from the previous stage's last checkpoint, at global step ``first_step``.

        Weights carry over by name: modules of plugins the stage drops (e.g. REPA's projector) are
        left behind and modules it adds keep their fresh init, both logged. Optimizer state carries
        over by parameter name when the checkpoint recorded names and the run is not sharded;
        otherwise it restarts (logged). Plugin state (EMA) loads non-strictly where the plugin allows.
        """
        parts, _ = self._read_checkpoint(info)
        trainable = self.run.require("trainable")
        sharded = is_sharded(trainable)
        current = trainable.state_dict()  # DTensors when sharded: names and global shapes are what matter
        saved = parts["trainable"]
        carried = {k: v for k, v in saved.items() if k in current}
        for key, value in carried.items():
            if tuple(value.shape) != tuple(current[key].shape):
                raise TrainingError(
                    f"stage continues from {info.path}, but '{key}' changed shape "
                    f"({tuple(value.shape)} -> {tuple(current[key].shape)}); stages may not change the model"
                )
        dropped = sorted(set(saved) - set(current))
        fresh = sorted(set(current) - set(saved))
        if dropped:
            logger.info("stage start: %d unused tensor(s) of the previous stage (%s)", len(dropped), _few(dropped))
        if fresh:
            logger.info("stage start: %d tensor(s) start from their init (%s)", len(fresh), _few(fresh))
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            # Fresh tensors keep their init: gathered (a collective, in the same order on every rank).
            full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sorted(current.items())}
            set_model_state_dict(trainable, {**full, **carried}, options=StateDictOptions(full_state_dict=True))
            logger.warning("stage start: optimizer state restarts (sharded run: state is not mapped by name)")
        else:
            trainable.load_state_dict({**current, **carried})
            self.optimizer.load_state_dict(self._carried_optimizer_state(parts))
        for key, obj in self.plugin_states().items():
            state = parts["plugins"].get(key)
            if state is None:
                logger.info("stage start: plugin state '%s' starts fresh (not in the previous stage)", key)
                continue
            try:
                obj.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError) as err:
                try:
                    obj.load_state_dict(state, strict=False)
                except TypeError:
                    raise TrainingError(f"stage start: cannot carry plugin state '{key}' over: {err}") from err
                logger.info("stage start: plugin state '%s' carried over where the modules match", key)
        self.step = first_step
        multipliers = [fn(first_step) for fn in self.scheduler.lr_lambdas]
        self.scheduler.last_epoch = first_step
        for group, base, mult in zip(self.optimizer.param_groups, self.scheduler.base_lrs, multipliers, strict=True):
            group["lr"] = base * mult
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        logger.info("stage starts at step %d from %s", first_step, info.path)

    def _carried_optimizer_state(self, parts: dict[str, Any]) -> dict[str, Any]:
        """The previous stage's optimizer state re-keyed by parameter name onto this stage's groups."""
        fresh = self.optimizer.state_dict()
        old_names = parts["trainer"].get("param_names")
        if not old_names:
            logger.warning("stage start: optimizer state restarts (the checkpoint has no parameter names)")
            return fresh
        old_state = parts["optimizer"]["state"]
        by_name = {name: old_state[i] for i, name in enumerate(old_names) if name and i in old_state}
        names = self._optimizer_param_names()
        state = {i: by_name[name] for i, name in enumerate(names) if name in by_name}
        if len(state) < len(names):
            fresh_count = len(names) - len(state)
            logger.info("stage start: optimizer state carried for %d param(s), fresh for %d", len(state), fresh_count)
        return {"state": state, "param_groups": fresh["param_groups"]}

    def _export(self) -> None:
        """The trained denoiser as a diffusers folder (PRXTransformer2DModel.from_pretrained)."""
        trainable = self.run.require("trainable")
        model = trainable.model
        if is_sharded(trainable):
            state, _ = full_state(trainable, self.optimizer)  # collective
            if not self.dist.is_main:
                return
            model = build_model(self.recipe.model, self.run.require("text_encoder").dim, torch.float32)
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        if self.dist.is_main:
            export_diffusers(model, self.run_dir / "final" / "transformer")
            sampling = self.sampling_modules()
            if sampling is not trainable:  # e.g. EMA: export the weights samples were made with too
                export_diffusers(sampling.model, self.run_dir / "final" / "transformer_sampling")

    # ------------------------------------------------------------------ robustness

    def _track(self, fn: Any, *args: Any) -> None:
        """A tracker failure is counted and logged; it never stops training. Rank 0 only."""
        if not self.dist.is_main:
            return
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - any tracker error must not kill a run
            self.tracker_failures += 1
            logger.exception("tracker call %s failed (%d so far)", getattr(fn, "__name__", fn), self.tracker_failures)

    @contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """SIGTERM, SIGUSR1 (cluster pre-emption notice) or a first Ctrl-C: finish the current step,
        checkpoint, exit cleanly. All ranks agree on the stop at the next step boundary."""

        def request_stop(signum: int, frame: FrameType | None) -> None:
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            logger.warning("signal %d received: stopping after this step (Ctrl-C again to abort)", signum)

        try:
            previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        except ValueError:  # not in the main thread (e.g. called from a test thread)
            previous = {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
