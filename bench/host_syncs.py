"""Count the host→device copies and device→host reads of one real ``train_step``, on a CPU.

    python bench/host_syncs.py              # plain flow matching, and TREAD + EMA + Muon
    python bench/host_syncs.py --where      # also print where each copy and read happens

A CUDA step stalls wherever the host waits for the device: a ``.item()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, the truth value of a tensor, an op whose output size depends on the data
(``nonzero``, boolean indexing), and every copy from pageable host memory. This script counts those
calls without a GPU. It trains the tiny recipe (two blocks of width 32, MiniLM captions, synthetic
shapes) for one step outside the count (warm text cache, optimizer state built), then runs the next
optimizer steps inside :func:`prx_core.transfer.simulated_accelerator`, so the trainer takes the
branches a CUDA run takes (device generators, non-blocking copies), under a ``TorchFunctionMode``
that follows every tensor from where it was made:

* a tensor is *host* when a factory made it without ``device=`` (``torch.tensor``, a draw from a
  CPU generator, a data source's ``torch.stack``), or an op made it from host tensors only;
  everything else (parameters, gradients, optimizer state, anything computed from them) is on the
  device, as it would be there;
* a ``.to(device)`` / ``copy_`` of a host tensor into a device tensor is a host→device copy (the
  mode hands back a copy, so the host tensor stays host as it would on a GPU);
* a read of a device tensor from the host (the calls above, or ``.to("cpu")``) is a device→host read.

The counts are per optimizer step, split by kind. The targets: one host→device batch copy per
micro-step and at most one device→host read per optimizer step (the finiteness check of the loss
and gradient norm). ``tests/unit/test_host_syncs.py`` keeps them from growing.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

_HOST = "_prx_host"  # attribute marking a tensor that lives in host memory

#: Tensor methods that read a device tensor's values on the host.
_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
}
#: Ops whose output size depends on the data: the host waits for the device to learn it.
_DATA_DEPENDENT = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.argwhere: "argwhere",
}


@dataclass
class Counts:
    """Copies and reads of one counted window, by kind, with where each happened."""

    #: (role, call) -> count, e.g. ("batch", "to").
    host_to_device: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    device_to_host: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    where: list[str] = field(default_factory=list)
    #: Bytes copied host→device.
    copied_bytes: int = 0

    def by_role(self, table: collections.Counter[tuple[str, str]]) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for (name, _), n in table.items():
            out[name] += n
        return out

    @property
    def copies(self) -> int:
        return sum(self.host_to_device.values())

    @property
    def reads(self) -> int:
        return sum(self.device_to_host.values())


def _is_host(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, _HOST, False)


def _mark_host(value: Any) -> None:
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            setattr(leaf, _HOST, True)


#: The device of the counted run: the CPU with an index, so that ``device=run.device`` (or a device
#: tensor's ``.device``) tells a device placement from a host one (``"cpu"``, a CPU generator's device).
SIMULATED_DEVICE = torch.device("cpu", 0)


def _is_host_device(device: str | torch.device) -> bool:
    device = torch.device(device)
    return device.type == "cpu" and device.index is None


@contextmanager
def _tensors_report_their_place() -> Iterator[None]:
    """``tensor.device`` answers :data:`SIMULATED_DEVICE` for device tensors and ``cpu`` for host ones.

    Code places new tensors with ``device=x.device``; on a GPU that is the GPU for a device tensor.
    The property is shadowed on ``torch.Tensor`` (the C base class keeps its own) for the window.
    """
    base = torch._C.TensorBase.device

    def device(tensor: torch.Tensor) -> torch.device:
        actual = base.__get__(tensor)
        return actual if _is_host(tensor) or actual.type != "cpu" else SIMULATED_DEVICE

    torch.Tensor.device = property(device)  # type: ignore[assignment]
    try:
        yield
    finally:
        del torch.Tensor.device


def _caller() -> traceback.FrameSummary | None:
    """The innermost frame in prx code (core or a plugin) that made the call, past the copy helper."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = Path(frame.filename).name
        if ("prx_core" in frame.filename or "/prx_" in frame.filename) and name != "transfer.py":
            return frame
    return None


#: Where a copy or read is made -> what it is. The step's own inputs come through ``prx_core.towers``;
#: the text encoder copies token ids (and transformers reads its mask) only for cache misses.
_ROLES = {
    "towers.py": "batch",
    "text_encoding.py": "text encoder (cache misses)",
    "text_cache.py": "text encoder (cache misses)",
    "trainer.py:train_step": "finiteness check",
}


def role(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "other"
    name = Path(frame.filename).name
    return _ROLES.get(f"{name}:{frame.name}", _ROLES.get(name, "other"))


class TransferCounter(TorchFunctionMode):
    """Follows host and device tensors through every torch call and counts the crossings."""

    def __init__(self, device_generators: Any) -> None:
        super().__init__()
        self.counts = Counts()
        self.device_generators = device_generators

    def _count(self, table: collections.Counter[tuple[str, str]], kind: str, direction: str) -> None:
        frame = _caller()
        table[(role(frame), kind)] += 1
        place = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" if frame else "?"
        self.counts.where.append(f"{direction} {kind:<8} {role(frame):<28} {place}")

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _READS and not _is_host(args[0]):
            self._count(self.counts.device_to_host, _READS[func], "D→H")
            return func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.copy_:
            destination, source = args[0], args[1]
            if isinstance(source, torch.Tensor) and _is_host(source) != _is_host(destination):
                if _is_host(source):
                    self._count(self.counts.host_to_device, "copy_", "H→D")
                    self.counts.copied_bytes += source.numel() * source.element_size()
                else:
                    self._count(self.counts.device_to_host, "copy_", "D→H")
            return func(*args, **kwargs)
        if func in _DATA_DEPENDENT or (func is torch.where and len(args) + len(kwargs) == 1):
            if not _is_host(args[0]):
                self._count(self.counts.device_to_host, _DATA_DEPENDENT.get(func, "where(cond)"), "D→H")
        elif func is torch.Tensor.__getitem__ and self._boolean_index(args[1]) and not _is_host(args[0]):
            self._count(self.counts.device_to_host, "bool index", "D→H")
        out = func(*args, **kwargs)
        if self._result_is_host(args, kwargs):
            _mark_host(out)
        return out

    @staticmethod
    def _boolean_index(index: Any) -> bool:
        leaves = tree_flatten(index)[0]
        return any(isinstance(x, torch.Tensor) and x.dtype == torch.bool and x.dim() > 0 for x in leaves)

    def _result_is_host(self, args: Any, kwargs: dict[str, Any]) -> bool:
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if tensors:
            return all(_is_host(t) for t in tensors)
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            return generator not in self.device_generators
        device = kwargs.get("device")
        return device is None or _is_host_device(device)

    def _move(self, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
        source = args[0]
        if func is torch.Tensor.cuda:
            to_host = False
        elif func is torch.Tensor.cpu:
            to_host = True
        else:
            device = kwargs.get("device")
            if device is None:
                device = next((a for a in args[1:] if isinstance(a, str | torch.device | torch.Tensor)), None)
            if device is None:  # a dtype cast: the result stays where the source is
                out = func(*args, **kwargs)
                if _is_host(source):
                    _mark_host(out)
                return out
            if isinstance(device, torch.Tensor):
                to_host = _is_host(device)
            elif isinstance(device, str) or _is_host(source):
                to_host = _is_host_device(device)
            else:
                # A ``torch.device("cpu")`` object applied to a device tensor comes from torch's own
                # grouping by real device (e.g. ``clip_grads_with_norm_``), where on a GPU it names the
                # GPU: the same place, no copy. Host reads spell ``"cpu"`` or call ``.cpu()``.
                to_host = False
        out = func(*args, **kwargs)
        if to_host and not _is_host(source):
            self._count(self.counts.device_to_host, func.__name__, "D→H")
            out = out.clone() if out is source else out
            _mark_host(out)
        elif not to_host and _is_host(source):
            self._count(self.counts.host_to_device, func.__name__, "H→D")
            self.counts.copied_bytes += source.numel() * source.element_size()
            out = out.clone() if out is source else out  # a new tensor, not the host one
            out.__dict__.pop(_HOST, None)
        elif _is_host(source):
            _mark_host(out)
        return out


def _recipe(directory: Path, patch: dict[str, Any]) -> Any:
    """The tiny recipe with ``patch``; a ``data`` table in the patch replaces the tiny one whole."""
    import copy

    from prx_core.recipe import deep_merge, dump_toml, load
    from prx_core.testing.fixtures import TINY_RECIPE

    table = deep_merge(copy.deepcopy(TINY_RECIPE), {k: v for k, v in patch.items() if k != "data"})
    table["data"] = patch.get("data", table["data"])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.toml").write_text(dump_toml(table), encoding="utf-8")
    return load(directory / "recipe.toml")


def _image_folder(scratch: Path) -> dict[str, Any]:
    """Decoded JPEG/PNG files: the source hands over uint8 pixels."""
    from prx_core.testing.image_data import write_image_folder

    root = write_image_folder(scratch / "images", n=24, corrupt=False, seed=0)
    return {
        "data": {
            "use": "image_folder",
            "root": str(root),
            "size": 32,
            "held_out": 4,
            "index_cache": "off",
            "caption_weights": {"long": 1.0},
        }
    }


def _precomputed(scratch: Path) -> dict[str, Any]:
    """``prx-run precompute`` of that folder: batches of stored latents, text states and masks."""
    from prx_core.commands.precompute import Options, precompute

    precompute(_recipe(scratch / "source", _image_folder(scratch)), Options(scratch / "shards", dtype="float32"))
    return {"data": {"use": "precomputed", "path": str(scratch / "shards")}}


#: The measured configurations: the tiny recipe as it is (synthetic shapes, rendered as floats), with
#: TREAD + EMA + Muon, and on decoded image files and on their precomputed encodings.
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "flow matching": {},
    "tread + ema + muon": {
        "model": {"depth": 4},
        "router": {"use": "tread", "start": 1, "end": 2, "ratio": 0.5},
        "plugins": {"ema": {"decay": 0.99, "every": 1}},
        "optimizer": {"use": "muon", "lr": 1e-3},
    },
    "image folder (uint8)": {},
    "precomputed": {},
}
#: Configurations whose data is written first, into the run's scratch folder.
PREPARE: dict[str, Callable[[Path], dict[str, Any]]] = {
    "image folder (uint8)": _image_folder,
    "precomputed": _precomputed,
}


@contextmanager
def _simulated() -> Iterator[Any]:
    """The accelerator code paths, where this prx has them (older code has no simulation)."""
    try:
        from prx_core import transfer
    except ImportError:
        yield set()
        return
    with transfer.simulated_accelerator():
        yield transfer.simulated_device_generators


def _place_on_simulated_device(trainer: Any) -> None:
    """Point the run (and its towers) at :data:`SIMULATED_DEVICE`; mark what torch keeps on the host.

    torch's foreach/for-loop AdamW keeps its ``step`` counts as host tensors (and reads them with
    ``.item()`` without a sync); fused AdamW, the CUDA default here, keeps them on the device and
    never reads them. Either way no device read, so they are marked host.
    """
    run = trainer.run
    run.device = SIMULATED_DEVICE
    encoder = getattr(run.text_encoder, "encoder", run.text_encoder)
    for tower in (encoder, run.latent_space):
        if isinstance(getattr(tower, "device", None), torch.device):
            tower.device = SIMULATED_DEVICE
    data = run.data
    produce = data.batch

    def host_batch(request: Any) -> Any:
        # A data source has no device: whatever it returns (including tensors it cached before the
        # counted window, which the mode has not seen made) is in host memory.
        raw = produce(request)
        _mark_host([value for value in vars(raw).values() if isinstance(value, torch.Tensor | dict)])
        return raw

    data.batch = host_batch
    for state in trainer.optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor) and step.dim() == 0:
            _mark_host(step)


#: Micro-steps per optimizer step in the counted runs.
ACCUMULATION = 2


def count_step(
    patch: dict[str, Any],
    steps: int = 2,
    accumulation: int = ACCUMULATION,
    prepare: Callable[[Path], dict[str, Any]] | None = None,
) -> tuple[Counts, int]:
    """Counts over ``steps`` optimizer steps of the tiny recipe with ``patch`` (after one warm step);
    ``prepare(scratch)`` writes the data first and returns its part of the patch."""
    from prx_core.recipe import deep_merge
    from prx_core.testing.fixtures import make_trainer

    patch = deep_merge(
        {"train": {"global_batch": 4, "micro_batch": 4 // accumulation, "steps": steps + 1, "count_flops": False}},
        patch,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if prepare is not None:
            patch = deep_merge(patch, prepare(Path(tmp)))
        recipe = _recipe(Path(tmp) / "recipe", patch)
        trainer = make_trainer(recipe, Path(tmp) / "run")
        trainer.train_step(0)  # warm: optimizer state, text cache, lazily built plugin state
        _place_on_simulated_device(trainer)
        with (
            _simulated() as device_generators,
            _tensors_report_their_place(),
            TransferCounter(device_generators) as counter,
        ):
            for step in range(1, steps + 1):
                trainer.train_step(step)
        return counter.counts, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps counted (after one warm step)")
    parser.add_argument("--where", action="store_true", help="print the call site of every copy and read")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import header

    print("\n".join(header(torch.device("cpu"))))
    print(f"per optimizer step of the tiny recipe (global batch 4 = 2 micro-steps × 2), mean of {args.steps} steps")
    print(f"{'configuration':<22} {'H→D copies':>10} {'H→D bytes':>10} {'D→H reads':>10}   by role (H→D | D→H)")
    failed = False
    for name, patch in CONFIGURATIONS.items():
        counts, steps = count_step(patch, args.steps, prepare=PREPARE.get(name))
        copies, reads = counts.by_role(counts.host_to_device), counts.by_role(counts.device_to_host)
        split = " | ".join(
            ", ".join(f"{k} {v / steps:g}" for k, v in sorted(table.items())) or "-" for table in (copies, reads)
        )
        print(
            f"{name:<22} {counts.copies / steps:>10g} {counts.copied_bytes / steps:>10g} {counts.reads / steps:>10g}"
            f"   {split}"
        )
        if args.where:
            for line, n in collections.Counter(counts.where).most_common():
                print(f"    {n / steps:g}× {line}")
        failed |= copies["batch"] > steps * ACCUMULATION or reads["finiteness check"] > steps
        failed |= copies["other"] > 0 or reads["other"] > 0
    print(
        "target: <= 1 H→D batch copy per micro-step (2 per step here), <= 1 D→H read per optimizer step (the\n"
        "finiteness check), nothing else; the text encoder copies token ids and transformers reads the mask\n"
        "once per forward of cache misses (none when every caption hits the cache)"
    )
    print("result: " + ("FAIL" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
