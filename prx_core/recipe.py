"""Recipes: TOML files that choose and parameterise plugins.

* ``extends = "parent.toml"`` names a single parent (relative to the file). Tables deep-merge;
  lists and scalars are replaced. A recipe (and its parent) may also live in an installed package,
  at a URL or on the Hugging Face Hub (:mod:`prx_core.recipe_sources`); each file read is recorded
  with its sha256 (:attr:`Recipe.sources`, written to run.json).
* Top-level ``remove = ["metrics.shapes_adherence", "plugins.ema"]`` drops tables (or keys) the
  recipe inherited, before its own tables merge over the parent's, so ``remove`` plus a fresh
  table replaces an inherited table whole.
* ``[requires]`` maps distributions to version specifiers (``"prx-tread" = ">=0.1"``); a missing
  or mismatched one is refused with the ``pip install`` line that fixes it.
* Every table binds strictly to a frozen dataclass (:mod:`prx_core.config`): core's own
  sections below, each slot entry's ``Config`` and each ``[plugins.<name>]`` plugin's ``Config``.
* ``--set a.b=value`` overrides go through the same merge and the same validation, and are
  recorded in the resolved recipe.
* :func:`validate` checks everything that can be checked without building a model: names,
  types, plugin ``requires``/``conflicts``, the shape contract between the latent space and
  the denoiser (reference.md §7.3, §7.4), the batch split, and each active plugin's
  ``prx_check_recipe(recipe)`` (block indices against ``model.depth``, text widths). ``prx-run
  check`` and the start of a run both go through it, so ``check`` refuses what a run would.

``tomli`` (TOML 1.1: multi-line inline tables) reads recipes; :func:`dump_toml` writes the resolved
recipe back as TOML 1.0, which both ``tomli`` and Python's ``tomllib`` read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli

from prx_core import recipe_sources
from prx_core.config import RecipeError, bind, suggest, to_table
from prx_core.finetune import agree_with_init
from prx_core.plugins import ActivePlugins, activate
from prx_core.registry import SLOTS

OVERRIDE_SOURCE = "--set"


# --------------------------------------------------------------------------- core sections


@dataclass(frozen=True)
class ModelConfig:
    """``diffusers.PRXTransformer2DModel`` arguments; the defaults are PRX-1.2B (reference.md §1)."""

    in_channels: int = 16
    patch_size: int = 2
    #: None: taken from the text encoder's width.
    context_in_dim: int | None = None
    hidden_size: int = 1792
    mlp_ratio: float = 3.5
    num_heads: int = 28
    depth: int = 16
    axes_dim: tuple[int, ...] = (32, 32)
    theta: int = 10000
    time_factor: float = 1000.0
    time_max_period: int = 10000
    bottleneck_size: int | None = None
    resolution_embeds: bool = False
    #: Fine-tuning (a fresh start only; prx_core/finetune.py): start from a diffusers
    #: PRXTransformer2DModel folder or Hub id, or "run:RUN_DIR" (that run's newest checkpoint).
    #: "": a random initialisation.
    init: str = ""
    #: Folder of the transformer inside ``init`` ("transformer" in a pipeline folder or repo).
    subfolder: str = ""
    #: Hub revision (branch, tag or commit) of ``init``; None: the default branch.
    revision: str | None = None
    #: With ``init = "run:..."``: start from that run's EMA weights instead of its trained ones.
    init_ema: bool = False

    def __post_init__(self) -> None:
        if not self.init and (self.subfolder or self.revision or self.init_ema):
            raise ValueError("subfolder, revision and init_ema describe model.init, which is not set")
        if self.init_ema and not self.init.startswith("run:"):
            raise ValueError("init_ema needs init = 'run:RUN_DIR' (a diffusers folder holds one set of weights)")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(
                f"axes_dim {list(self.axes_dim)} must sum to the head dim {self.hidden_size // self.num_heads}"
            )
        for name in ("in_channels", "patch_size", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop. Defaults follow the PRX baseline (reference.md §3)."""

    steps: int = 100_000
    global_batch: int = 256
    #: Per-process batch of one forward pass; None means global_batch / world_size (no accumulation).
    micro_batch: int | None = None
    #: Gradient-norm clip; 0 disables.
    grad_clip: float = 0.2
    log_every: int = 50
    #: Sample grid every N steps (0: only at the end).
    sample_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Recompute block activations in the backward pass (less memory, ~30% more compute).
    activation_checkpointing: bool = False
    #: "blocks": torch.compile each transformer block (regional compilation; state-dict keys
    #: unchanged). Off by default: it costs compile time before the first step (tens of seconds
    #: per new shape, more on CPU, where it needs a C++ compiler) and pays off on a GPU only.
    compile: Literal["off", "blocks"] = "off"
    #: Data parallelism when launched on several processes (torchrun / accelerate launch).
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    #: Non-finite loss or gradient: "halt" stops before the optimizer step; "skip" drops the step.
    nonfinite: Literal["halt", "skip"] = "halt"
    #: Count the FLOPs of one real step at start (one extra forward/backward) to report MFU.
    count_flops: bool = True
    #: Peak FLOP/s of one device in TFLOP/s for MFU; None: known GPUs' bf16 peak, no MFU on CPU.
    peak_tflops: float | None = None
    #: CUDA: deterministic kernels only (``torch.use_deterministic_algorithms``), so a resumed run
    #: repeats an uninterrupted one bitwise on the same GPU and software; slower (README, "Determinism").
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError("micro_batch must be >= 1")
        if self.keep_checkpoints < 2:
            raise ValueError("keep_checkpoints must be >= 2, so a corrupt newest checkpoint has a fallback")
        if self.grad_clip < 0 or self.sample_every < 0:
            raise ValueError("grad_clip and sample_every must be >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate multiplier: linear warm-up, then constant (the PRX baseline, reference.md §3) or a decay."""

    warmup_steps: int = 1000
    kind: Literal["constant", "cosine", "linear"] = "constant"
    #: Final multiplier of the decaying schedules, as a fraction of the peak learning rate.
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio must be in [0, 1]")


@dataclass(frozen=True)
class SamplingConfig:
    """Sample grids and inference defaults (reference.md §2: evaluation uses 50 steps at CFG 3.5).

    ``cfg`` is the classifier-free guidance scale: out = u + cfg·(c − u) when ``cfg`` > 1. At
    ``cfg`` ≤ 1 the conditional model runs alone, with no unconditional pass, as in the public
    code (reference.md §8): ``cfg = 0`` does not give unconditional samples. A guidance plugin
    (TREAD's ``self_guidance``) replaces CFG, and ``cfg`` is then unused.
    """

    steps: int = 50
    cfg: float = 3.5
    #: Number of grid prompts taken from the data source's held-out captions when prompts is empty.
    num_prompts: int = 8
    prompts: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.num_prompts < 1:
            raise ValueError("steps and num_prompts must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation (reference.md §3: every 10k steps, held-out captions at bucket size, CFG 3.5, 50 steps).

    Each evaluation reports the validation loss per timestep bin and every metric listed under
    ``[metrics.<name>]``, computed from ``num_samples`` images generated from held-out captions.
    ``cfg`` works as ``sampling.cfg`` does: guidance above 1, the conditional model alone at ≤ 1
    (reference.md §8), unused when a guidance plugin (TREAD's ``self_guidance``) replaces CFG.
    """

    #: Evaluate every N steps (0: never during training).
    every: int = 0
    #: Also evaluate when training finishes.
    at_end: bool = True
    num_samples: int = 64
    #: Images generated per forward batch on each rank.
    batch: int = 16
    steps: int = 50
    cfg: float = 3.5
    #: Noise seed; sample i always gets the same noise, different from sample j.
    seed: int = 1234
    #: Validation loss is reported for this many equal-width t bins over (0, 1).
    t_bins: int = 5

    def __post_init__(self) -> None:
        if self.every < 0 or self.num_samples < 1 or self.batch < 1 or self.steps < 1 or self.t_bins < 1:
            raise ValueError("every must be >= 0; num_samples, batch, steps and t_bins must be >= 1")


CORE_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "schedule": ScheduleConfig,
    "sampling": SamplingConfig,
    "eval": EvalConfig,
}
TOP_LEVEL_SCALARS = ("name", "seed", "description", "extends", "reference")
#: Top-level keys besides the scalars and the tables: ``remove`` is consumed while loading.
TOP_LEVEL_TABLES = ("requires",)
#: Slot defaults: core's builtins (core features are plugins too). Slots without a default must be chosen.
SLOT_DEFAULTS: dict[str, str | None] = {
    "latent_space": "pixel",
    "text_encoder": None,
    "objective": "flow_matching",
    "router": None,
    "optimizer": "adamw",
    "precision": "bf16_mixed",
    "metric": None,
    "data": "synthetic_shapes",
    "tracker": "console",
}
#: Slots a recipe picks with ``[slot] use = ...``. Metrics are listed by the evaluation section.
RECIPE_SLOTS = tuple(s for s in SLOTS if s != "metric")


@dataclass(frozen=True)
class SlotChoice:
    use: str
    config: Any
    plugin: str


@dataclass
class Recipe:
    """A validated recipe: every table bound, every plugin resolved."""

    name: str
    seed: int
    description: str
    model: ModelConfig
    train: TrainConfig
    schedule: ScheduleConfig
    sampling: SamplingConfig
    eval: EvalConfig
    slots: dict[str, SlotChoice]
    metrics: dict[str, SlotChoice]
    plugins: dict[str, Any]
    #: The recipe named first: a local path, or a pkg:/ep:/URL/hf:// reference.
    source: Path | str | None
    overrides: list[str]
    active: ActivePlugins = field(repr=False)
    #: ``[[stages]]``: consecutive parts of one run, each with its own effective recipe (empty: one stage).
    stages: list[Stage] = field(default_factory=list)
    #: The ``[[stages]]`` tables as written (after ``--set``), for the resolved recipe.
    stage_tables: list[dict[str, Any]] = field(default_factory=list, repr=False)
    #: The reference.md §5 row this recipe reproduces (a key of :data:`prx_core.published.PUBLISHED`), or "".
    reference: str = ""
    #: ``[requires]`` as written: distribution -> version specifier ("" for any version).
    requires: dict[str, str] = field(default_factory=dict)
    #: Every file read, the recipe named first: ``{"source": ref, "sha256": hex[, "commit": sha]}``.
    sources: list[dict[str, str]] = field(default_factory=list)

    def slot_config(self, slot: str) -> Any:
        return self.slots[slot].config

    def resolved(self) -> dict[str, Any]:
        """The complete recipe with every default filled in; re-loadable by :func:`load`."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "description": self.description}
        if self.reference:
            out["reference"] = self.reference
        for section in CORE_SECTIONS:
            table = to_table(getattr(self, section))
            out[section] = {k: v for k, v in table.items() if v is not None}
        for slot, choice in self.slots.items():
            table = {"use": choice.use, **to_table(choice.config)}
            out[slot] = {k: v for k, v in table.items() if v is not None}
        if self.metrics:
            out["metrics"] = {
                n: {k: v for k, v in to_table(c.config).items() if v is not None}
                for n, c in sorted(self.metrics.items())
            }
        if self.plugins:
            out["plugins"] = {
                n: {k: v for k, v in to_table(c).items() if v is not None} for n, c in sorted(self.plugins.items())
            }
        if self.stage_tables:
            out["stages"] = [dict(t) for t in self.stage_tables]
        return out

    def used_requires(self) -> dict[str, str]:
        """``[requires]`` filled from the installed plugins this recipe uses (``">=<installed>"``).

        The recipe's own specifiers are kept; a used plugin distribution it does not name is added
        with its installed version as the lower bound. Core's builtins need no entry.
        """
        from prx_core.plugins import installed_plugins

        installed = installed_plugins()
        used = {c.plugin for c in self.slots.values()} | {c.plugin for c in self.metrics.values()} | set(self.plugins)
        requires = dict(self.requires)
        for name in sorted(used - self.active.builtin):
            plugin = installed.get(name)
            if plugin is not None and plugin.distribution != "?" and plugin.distribution not in requires:
                requires[plugin.distribution] = f">={plugin.version}"
        return dict(sorted(requires.items()))

    def shared(self) -> dict[str, Any]:
        """:meth:`resolved` with ``[requires]`` filled (:meth:`used_requires`): what a run directory's
        recipe.toml holds, and what ``prx-run show`` and ``prx-run diff`` compare."""
        out = self.resolved()
        requires = self.used_requires()
        if not requires:
            return out
        head: dict[str, Any] = {k: out.pop(k) for k in ("name", "seed", "description", "reference") if k in out}
        return {**head, "requires": requires, **out}


@dataclass
class Stage:
    """One ``[[stages]]`` entry: global steps ``first_step + 1 .. last_step`` trained with ``recipe``.

    ``recipe`` is the parent recipe with the stage's tables deep-merged over it, its ``remove``
    tables dropped, the recipe's ``--set`` overrides applied again on top (so a smoke-test override
    wins in every stage), and ``train.steps = last_step``.
    """

    index: int
    name: str
    first_step: int
    last_step: int
    recipe: Recipe

    @property
    def dir_name(self) -> str:
        return f"{self.index + 1}-{self.name}"


# --------------------------------------------------------------------------- loading


@dataclass
class RawRecipe:
    """The merged tables and, for every dotted key, the file it came from."""

    data: dict[str, Any]
    origin: dict[str, str]
    source: Path | str | None
    overrides: list[str] = field(default_factory=list)
    #: The files read, the recipe named first (see :attr:`Recipe.sources`).
    sources: list[dict[str, str]] = field(default_factory=list)

    def most_derived(self, *keys: str) -> str:
        """Of the sources of ``keys``, the one closest to the recipe named first (``--set`` first of all).

        A conflict between two keys is the doing of the file that came last in the ``extends``
        chain: a child that switches the latent space over a parent's ``in_channels``.
        """
        rank = {OVERRIDE_SOURCE: -1, **{entry["source"]: i for i, entry in enumerate(self.sources)}}
        return min((self.where(k) for k in keys), key=lambda src: rank.get(src, len(rank)))

    def where(self, dotted: str) -> str:
        """Source of a dotted key, falling back to its nearest parent table, then the leaf file."""
        key = dotted.split("[")[0]
        while key:
            if key in self.origin:
                return self.origin[key]
            key = key.rpartition(".")[0]
        return str(self.source) if self.source else "recipe"


def _record(origin: dict[str, str], table: Mapping[str, Any], src: str, prefix: str = "") -> None:
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        origin[dotted] = src
        if isinstance(value, Mapping):
            _record(origin, value, src, f"{dotted}.")


def deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Tables merge recursively; anything else in ``top`` (lists included) replaces ``base``."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


#: Inside a slot table: the keys it inherited from a parent table that named another entry.
INHERITED = "__inherited__"


def merge_recipe(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`deep_merge`, aware that a slot table may switch entries.

    When ``top`` names another entry for a slot (``[optimizer] use = "muon"`` over an AdamW
    parent), the keys inherited from the parent's table are recorded under :data:`INHERITED`;
    binding keeps those the new entry's config has (``lr``) and drops the others (AdamW's
    ``betas``), while keys written for the new entry stay strictly checked.
    """
    merged = deep_merge(base, top)
    for slot in RECIPE_SLOTS:
        new, old = top.get(slot), base.get(slot)
        if not (isinstance(new, Mapping) and isinstance(old, Mapping)):
            continue
        if "use" in new and new["use"] != old.get("use", SLOT_DEFAULTS[slot]):
            inherited = sorted(k for k in old if k not in new and k not in ("use", INHERITED))
            merged[slot] = {**merged[slot], INHERITED: inherited}
        elif INHERITED in old:
            merged[slot] = {**merged[slot], INHERITED: [k for k in old[INHERITED] if k not in new]}
    return merged


def load_raw(path: str | Path, _chain: tuple[str, ...] = ()) -> RawRecipe:
    """Read a recipe and its ``extends`` chain (a local path or a :mod:`prx_core.recipe_sources` reference)."""
    ref = str(path) if recipe_sources.is_remote(str(path)) else str(Path(path).resolve())
    if ref in _chain:
        raise RecipeError(f"{ref}: 'extends' forms a cycle: {' -> '.join((*_chain, ref))}")
    text = recipe_sources.read(ref)
    try:
        data = tomli.loads(text.data.decode("utf-8"))
    except (tomli.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{ref}: invalid TOML: {err}") from err
    parent = data.pop("extends", None)
    remove = data.pop("remove", None)
    origin: dict[str, str] = {}
    merged: dict[str, Any] = {}
    sources = [text.record()]
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{ref}: 'extends' must be a path or reference string, got {parent!r}")
        base = load_raw(recipe_sources.join(text, parent), (*_chain, ref))
        merged, origin = base.data, dict(base.origin)
        sources += base.sources
    if remove is not None:
        merged = _remove_inherited(merged, origin, remove, ref, parent is not None)
    _record(origin, data, ref)
    return RawRecipe(merge_recipe(merged, data), origin, text.path or ref, sources=sources)


def _remove_inherited(
    merged: dict[str, Any], origin: dict[str, str], remove: Any, ref: str, has_parent: bool
) -> dict[str, Any]:
    """Top-level ``remove``: the dotted tables (or keys) dropped from what the parent gave."""
    if not isinstance(remove, list) or not all(isinstance(r, str) and r for r in remove):
        raise RecipeError(f"{ref}: 'remove' must be a list of dotted table names, got {remove!r}")
    if not has_parent:
        raise RecipeError(f"{ref}: 'remove' drops inherited tables, but this recipe has no 'extends'")
    data = dict(merged)
    for dotted in remove:
        parts = dotted.split(".")
        parent: Any = data
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, Mapping) else None
        if not isinstance(parent, Mapping) or parts[-1] not in parent:
            raise RecipeError(f"{ref}: cannot remove '{dotted}': the parent recipe has no such table")
        del _copy_path(data, parts[:-1])[parts[-1]]
        for key in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
            del origin[key]
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value``: the value is parsed as a TOML value, or taken as a bare string."""
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"{OVERRIDE_SOURCE}: expected KEY=VALUE with a dotted key, got {text!r}")
    try:
        value = tomli.loads(f"v = {value_text.strip()}")["v"]
    except tomli.TOMLDecodeError:
        value = value_text.strip()
    return key.split("."), value


def _set_path(data: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """``data`` with ``parts`` set to ``value``; a numeric part indexes an array (``stages.1.steps``)."""
    head, rest = parts[0], parts[1:]
    current = data.get(head)
    if isinstance(current, list) and rest and rest[0].isdigit():
        position = int(rest[0])
        if position >= len(current):
            raise RecipeError(
                f"{OVERRIDE_SOURCE}: '{'.'.join(parts)}': '{head}' has {len(current)} entries (0-based index)"
            )
        items = list(current)
        entry = items[position]
        if len(rest) == 1:
            items[position] = value
        elif isinstance(entry, Mapping):
            items[position] = _set_path(dict(entry), rest[1:], value)
        else:
            raise RecipeError(f"{OVERRIDE_SOURCE}: '{'.'.join(parts)}': {head}[{position}] is not a table")
        return {**data, head: items}
    patch: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        patch = {part: patch}
    return merge_recipe(data, patch)


def apply_overrides(raw: RawRecipe, overrides: list[str]) -> RawRecipe:
    data = raw.data
    origin = dict(raw.origin)
    for text in overrides:
        parts, value = parse_override(text)
        data = _set_path(data, parts, value)
        patch: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            patch = {part: patch}
        _record(origin, patch, OVERRIDE_SOURCE)
    return RawRecipe(data, origin, raw.source, [*raw.overrides, *overrides], raw.sources)


def load(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return load_with_origins(path, overrides)[0]


def load_with_origins(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, RawRecipe]:
    """The validated recipe and the merged tables it came from (with every key's source)."""
    raw = load_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return validate(raw), raw


# --------------------------------------------------------------------------- validation


def _table(raw: RawRecipe, key: str) -> dict[str, Any]:
    value = raw.data.get(key, {})
    if not isinstance(value, Mapping):
        raise RecipeError(f"{raw.where(key)}: '{key}' must be a table, got {value!r}")
    return dict(value)


def validate(raw: RawRecipe) -> Recipe:
    """Bind and check a merged recipe; a recipe with ``[[stages]]`` is checked once per stage too."""
    stage_tables = raw.data.get("stages")
    if stage_tables is None:
        return _validate_single(raw)
    base_data = {k: v for k, v in raw.data.items() if k != "stages"}
    tables = _check_stage_tables(raw, stage_tables)
    total = sum(int(t["steps"]) for t in tables)
    base_raw = RawRecipe(
        deep_merge(base_data, {"train": {"steps": total}}), raw.origin, raw.source, raw.overrides, raw.sources
    )
    recipe = _validate_single(base_raw)
    first = 0
    for index, table in enumerate(tables):
        last = first + int(table["steps"])
        effective = _stage_data(base_data, table, raw, index)
        effective = deep_merge(effective, {"train": {"steps": last}})
        stage_raw = RawRecipe(effective, raw.origin, raw.source, raw.overrides, raw.sources)
        try:
            stage_recipe = _validate_single(stage_raw)
        except RecipeError as err:
            raise RecipeError(f"stage {index + 1} ('{table['name']}'): {err}") from err
        recipe.stages.append(Stage(index, str(table["name"]), first, last, stage_recipe))
        first = last
    recipe.stage_tables = [dict(t) for t in tables]
    return recipe


#: Keys of a ``[[stages]]`` entry besides recipe tables.
STAGE_KEYS = ("name", "steps", "remove")


def _check_stage_tables(raw: RawRecipe, value: Any) -> list[dict[str, Any]]:
    where = raw.where("stages")
    if not isinstance(value, list) or not value or not all(isinstance(t, Mapping) for t in value):
        raise RecipeError(f"{where}: 'stages' must be a non-empty array of tables ([[stages]])")
    overlayable = (*CORE_SECTIONS, *RECIPE_SLOTS, "plugins", "metrics")
    names: set[str] = set()
    tables = []
    for index, table in enumerate(value):
        label = f"{where}: stages[{index}]"
        for key in table:
            if key not in (*STAGE_KEYS, *overlayable):
                raise RecipeError(f"{label}: unknown key '{key}'{suggest(key, (*STAGE_KEYS, *overlayable))}")
            if key in overlayable and not isinstance(table[key], Mapping):
                raise RecipeError(f"{label}: '{key}' must be a table of recipe settings")
        name = table.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise RecipeError(f"{label}: 'name' must be a non-empty name of letters, digits, '-' or '_', got {name!r}")
        if name in names:
            raise RecipeError(f"{label}: stage name '{name}' is used twice")
        names.add(name)
        steps = table.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise RecipeError(f"{label} ('{name}'): 'steps' must be an int >= 1, got {steps!r}")
        remove = table.get("remove", [])
        if not isinstance(remove, list) or not all(isinstance(r, str) and r for r in remove):
            raise RecipeError(f"{label} ('{name}'): 'remove' must be a list of dotted table names")
        tables.append(dict(table))
    return tables


def _stage_data(base: dict[str, Any], table: Mapping[str, Any], raw: RawRecipe, index: int) -> dict[str, Any]:
    overlay = {k: v for k, v in table.items() if k not in STAGE_KEYS}
    data = merge_recipe(base, overlay)
    # --set overrides win over stage tables, so one override scales every stage down; a stage's
    # ``remove`` still wins over them (``--set plugins.repa.weights=…`` must not revive REPA).
    for text in raw.overrides:
        parts, value = parse_override(text)
        if parts[0] != "stages":
            data = _set_path(data, parts, value)
    for dotted in table.get("remove", []):
        parts = dotted.split(".")
        parent: Any = data
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, Mapping) else None
        if not isinstance(parent, dict) or parts[-1] not in parent:
            raise RecipeError(
                f"{raw.where('stages')}: stages[{index}] ('{table['name']}'): cannot remove '{dotted}': the recipe "
                "has no such table"
            )
        parent = _copy_path(data, parts[:-1])
        del parent[parts[-1]]
    return data


def _copy_path(data: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The table at ``parts``, copied along the way so shared parent tables are not mutated."""
    table = data
    for part in parts:
        table[part] = dict(table[part])
        table = table[part]
    return table


def _validate_single(raw: RawRecipe) -> Recipe:
    allowed = (*TOP_LEVEL_SCALARS, *TOP_LEVEL_TABLES, *CORE_SECTIONS, *RECIPE_SLOTS, "plugins", "metrics")
    for key in raw.data:
        if key not in allowed:
            raise RecipeError(f"{raw.where(key)}: unknown key '{key}'{suggest(key, allowed)}")
    name = raw.data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RecipeError(f"{raw.where('name')}: 'name' must be a non-empty string (it names the run directory)")
    if "/" in name or name.startswith("."):
        raise RecipeError(f"{raw.where('name')}: 'name' must not contain '/' or start with '.', got {name!r}")
    seed = raw.data.get("seed", 42)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise RecipeError(f"{raw.where('seed')}: 'seed' must be a non-negative int, got {seed!r}")
    description = raw.data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{raw.where('description')}: 'description' must be a string")
    reference = _reference(raw)
    requires = check_requires(raw)

    tables = {s: _table(raw, s) for s in CORE_SECTIONS}
    # [model] init: the checkpoint's config fills the unset architecture keys and must match the set ones.
    tables["model"] = agree_with_init(tables["model"], config_fields(ModelConfig), raw.where)
    sections: dict[str, Any] = {s: bind(cls, tables[s], prefix=s, where=raw.where) for s, cls in CORE_SECTIONS.items()}

    choices: dict[str, str] = {}
    for slot in RECIPE_SLOTS:
        table = _table(raw, slot)
        use = table.get("use", SLOT_DEFAULTS[slot])
        if use is None:
            if slot == "router":
                continue
            raise RecipeError(f"{raw.where(slot)}: slot '{slot}' has no default; set '{slot}.use'")
        if not isinstance(use, str):
            raise RecipeError(f"{raw.where(slot + '.use')}: '{slot}.use' must be a name string, got {use!r}")
        choices[slot] = use
    plugin_tables = _table(raw, "plugins")
    for pname, ptable in plugin_tables.items():
        if not isinstance(ptable, Mapping):
            raise RecipeError(f"{raw.where('plugins.' + pname)}: 'plugins.{pname}' must be a table")

    metric_tables = _table(raw, "metrics")
    for mname, mtable in metric_tables.items():
        if not isinstance(mtable, Mapping):
            raise RecipeError(f"{raw.where('metrics.' + mname)}: 'metrics.{mname}' must be a table")

    _check_named_plugins_installed(raw, choices, plugin_tables, metric_tables)
    active = activate(choices, plugin_tables, where=str(raw.source or "recipe"), metric_names=list(metric_tables))

    slots: dict[str, SlotChoice] = {}
    for slot, use in choices.items():
        entry = active.registries[slot].get(use, where=raw.where(f"{slot}.use"))
        table = {k: v for k, v in _table(raw, slot).items() if k not in ("use", INHERITED)}
        inherited = set(_table(raw, slot).get(INHERITED, []))
        if inherited:
            known = set(config_fields(entry.config)) if entry.config is not None else set()
            table = {k: v for k, v in table.items() if k not in inherited - known}
        slots[slot] = SlotChoice(use, bind(entry.config, table, prefix=slot, where=raw.where), entry.plugin)

    metrics: dict[str, SlotChoice] = {}
    for mname, mtable in sorted(metric_tables.items()):
        entry = active.registries["metric"].get(mname, where=raw.where(f"metrics.{mname}"), key=f"metrics.{mname}")
        metrics[mname] = SlotChoice(
            mname, bind(entry.config, mtable, prefix=f"metrics.{mname}", where=raw.where), entry.plugin
        )

    plugins: dict[str, Any] = {}
    for pname, ptable in sorted(plugin_tables.items()):
        info = active.infos[pname]
        if info.config is None:
            if ptable:
                raise RecipeError(f"{raw.where('plugins.' + pname)}: plugin '{pname}' takes no settings")
            plugins[pname] = None
        else:
            plugins[pname] = bind(info.config, ptable, prefix=f"plugins.{pname}", where=raw.where)

    recipe = Recipe(
        name=name,
        seed=seed,
        description=description,
        reference=reference,
        model=sections["model"],
        train=sections["train"],
        schedule=sections["schedule"],
        sampling=sections["sampling"],
        eval=sections["eval"],
        slots=slots,
        metrics=metrics,
        plugins=plugins,
        source=raw.source,
        overrides=list(raw.overrides),
        active=active,
        requires=requires,
        sources=list(raw.sources),
    )
    check_compatibility(recipe, raw)
    return recipe


def _reference(raw: RawRecipe) -> str:
    """``reference = "<table>/<row>"``: the published reference.md §5 result the recipe reproduces (for reports).

    Not inherited through ``extends``: it names the experiment of the file that states it, so an
    ablation of the baseline does not borrow the baseline's published numbers.
    """
    from prx_core.published import lookup

    stated_here = raw.where("reference") in (str(raw.source), OVERRIDE_SOURCE)
    reference = raw.data.get("reference", "") if stated_here else ""
    if not isinstance(reference, str):
        raise RecipeError(f"{raw.where('reference')}: 'reference' must be a string, got {reference!r}")
    if reference:
        try:
            lookup(reference)
        except KeyError as err:
            raise RecipeError(f"{raw.where('reference')}: 'reference': {err.args[0]}") from None
    return reference


def pip_line(requirements: list[str]) -> str:
    return "pip install " + " ".join(f'"{r}"' for r in requirements)


def check_requires(raw: RawRecipe) -> dict[str, str]:
    """``[requires]``: distribution -> version specifier. Every one must be installed and match.

    All the problems are reported at once, with one ``pip install`` line that fixes them.
    """
    from importlib import metadata

    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.utils import InvalidName, canonicalize_name
    from packaging.version import InvalidVersion, Version

    table = _table(raw, "requires")
    requires: dict[str, str] = {}
    problems: list[str] = []
    fixes: list[str] = []
    bad: list[str] = []
    for dist, spec in table.items():
        key = f"requires.{dist}"
        if not isinstance(spec, str):
            raise RecipeError(f"{raw.where(key)}: '{key}' must be a version specifier string such as \">=0.1\"")
        try:
            canonicalize_name(dist, validate=True)
            specifier = SpecifierSet(spec)
        except (InvalidName, InvalidSpecifier) as err:
            raise RecipeError(f"{raw.where(key)}: '{key}': {err}") from None
        requires[dist] = spec
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            problems.append(f"{dist}{spec} is not installed")
            fixes.append(f"{dist}{spec}")
            bad.append(dist)
            continue
        try:
            matches = specifier.contains(Version(installed), prereleases=True)
        except InvalidVersion:
            matches = False
        if not matches:
            problems.append(f"{dist}{spec} is required but {dist} {installed} is installed")
            fixes.append(f"{dist}{spec}")
            bad.append(dist)
    if problems:
        where = raw.where(f"requires.{bad[0]}")
        raise RecipeError(f"{where}: {'; '.join(problems)}; install with: {pip_line(fixes)}")
    return requires


def _check_named_plugins_installed(
    raw: RawRecipe, choices: dict[str, str], plugin_tables: Mapping[str, Any], metric_tables: Mapping[str, Any]
) -> None:
    """A named entry that a known plugin package provides, but which is not installed: the pip line."""
    from prx_core.plugin_index import KNOWN_PLUGIN_DISTRIBUTIONS
    from prx_core.plugins import installed_plugins

    named = [(f"{slot}.use", use) for slot, use in choices.items()]
    named += [(f"plugins.{name}", name) for name in plugin_tables]
    named += [(f"metrics.{name}", name) for name in metric_tables]
    installed = installed_plugins()
    for key, name in named:
        dist = KNOWN_PLUGIN_DISTRIBUTIONS.get(name)
        if dist is not None and name not in installed:
            raise RecipeError(
                f"{raw.where(key)}: '{key}' names '{name}', which the plugin package {dist} provides, and {dist} "
                f"is not installed; install with: {pip_line([dist])}"
            )


def capabilities(recipe: Recipe) -> set[str]:
    caps = {f"{slot}:{choice.use}" for slot, choice in recipe.slots.items()}
    caps |= {f"plugin:{name}" for name in recipe.plugins}
    caps |= {f"metric:{name}" for name in recipe.metrics}
    return caps


def check_compatibility(recipe: Recipe, raw: RawRecipe) -> None:
    """Cross-plugin checks that need no model: requires/conflicts and tensor shapes."""
    caps = capabilities(recipe)
    involved = {c.plugin for c in recipe.slots.values()} | {c.plugin for c in recipe.metrics.values()}
    involved |= set(recipe.plugins)
    for pname in sorted(involved):
        info = recipe.active.infos[pname]
        missing = [r for r in info.requires if r not in caps]
        if missing:
            raise RecipeError(
                f"{raw.source}: plugin '{pname}' requires {', '.join(missing)}, which this recipe does not "
                f"select (it selects {', '.join(sorted(caps))})"
            )
        clashes = [c for c in info.conflicts if c in caps]
        if clashes:
            raise RecipeError(f"{raw.source}: plugin '{pname}' conflicts with {', '.join(clashes)}")

    latent = recipe.slot_config("latent_space")
    if latent.channels != recipe.model.in_channels:
        where, (a, b) = _conflict(raw, "model.in_channels", "latent_space.use")
        raise RecipeError(
            f"{where}: 'model.in_channels' is {recipe.model.in_channels}{a} but latent "
            f"space '{recipe.slots['latent_space'].use}'{b} produces {latent.channels} channels"
        )
    text_dim = recipe.slot_config("text_encoder").dim
    if recipe.model.context_in_dim is not None and recipe.model.context_in_dim != text_dim:
        where, (a, b) = _conflict(raw, "model.context_in_dim", "text_encoder.use")
        raise RecipeError(
            f"{where}: 'model.context_in_dim' is {recipe.model.context_in_dim}{a} but "
            f"text encoder '{recipe.slots['text_encoder'].use}'{b} produces {text_dim}-d states; leave it unset"
        )
    size = getattr(recipe.slot_config("data"), "size", None)
    if size is not None:
        factor = latent.spatial_compression * recipe.model.patch_size
        if size % factor:
            where, (a, b, c) = _conflict(raw, "data.size", "latent_space.use", "model.patch_size")
            raise RecipeError(
                f"{where}: image size {size}{a} is not divisible by latent compression{b} × patch size{c} = {factor}"
            )
    micro, batch = recipe.train.micro_batch, recipe.train.global_batch
    if micro is not None and batch % micro:
        raise RecipeError(
            f"{raw.where('train.micro_batch')}: 'train.micro_batch' is {micro}, which does not divide "
            f"train.global_batch = {batch}; no world size splits it into whole micro-batches "
            "(global_batch = micro_batch × accumulation steps × world size)"
        )
    check_plugins(recipe, raw)


def _conflict(raw: RawRecipe, *keys: str) -> tuple[str, list[str]]:
    """Where to report a conflict between ``keys``, and a "(set in FILE)" note per key.

    The error is reported against the file that made the latest conflicting choice (the child that
    switched the latent space, not the parent that set ``in_channels``). When the keys come from
    different files, each is named next to its key; when they all come from one, the prefix says it.
    """
    where = raw.most_derived(*keys)
    sources = [raw.where(k) for k in keys]
    if len(set(sources)) == 1:
        return where, ["" for _ in keys]
    return where, [f" (set in {src})" for src in sources]


#: A ``prx_check_recipe`` message that starts with a quoted recipe key: ``'router.end' is 9, ...``.
_LEADING_KEY = re.compile(r"^'([A-Za-z_][\w.\-]*)'")


def check_plugins(recipe: Recipe, raw: RawRecipe) -> None:
    """Every active plugin's ``prx_check_recipe(recipe)``; the problems are raised as one error.

    Each message is prefixed with the file that set the key it starts with (the recipe's own file
    otherwise) and the messages are sorted, so the error does not depend on plugin order.
    """
    problems: list[str] = []
    for messages in recipe.active.manager.hook.prx_check_recipe(recipe=recipe):
        for message in messages or []:
            match = _LEADING_KEY.match(message)
            where = raw.where(match.group(1)) if match else str(raw.source or "recipe")
            problems.append(f"{where}: {message}")
    if problems:
        raise RecipeError("; ".join(sorted(problems)))


# --------------------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write non-finite float {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def dump_toml(data: Mapping[str, Any], header: str = "") -> str:
    """Write nested tables as TOML. Tables of tables become ``[a.b]`` sections."""
    lines = [f"# {line}" for line in header.splitlines()]

    def emit(table: Mapping[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in table.items() if not _is_section(v)}
        sections = {k: v for k, v in table.items() if _is_section(v)}
        if path and (scalars or not sections):
            lines.append("")
            lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in sections.items():
            emit(v, [*path, k])

    emit(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_section(value: Any) -> bool:
    # A table whose values are all scalars or lists is still a section; only caption-weight-like
    # tables nested inside a section are written inline, which _toml_value handles.
    return isinstance(value, Mapping)


def config_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
