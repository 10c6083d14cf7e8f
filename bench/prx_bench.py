"""Shared by the step benchmarks: the ``bench_inputs`` plugin (timing and headers are in ``_common``).

``bench_inputs`` is an ordinary prx plugin (the same hooks and registries every plugin uses) that
fills three slots with fixed random inputs at real sizes, so a benchmark times the trainer and
the denoiser rather than a data loader or a frozen tower:

* data source ``bench_inputs``: the same random batch every step, made once on the run's device
  (N(0, 1) "latents" or [0, 1] "images" of ``channels × size × size``) with distinct captions;
* latent space ``bench_inputs``: the identity with ``channels`` channels (the batch already holds
  latents: 16 × 32 × 32 is what the FLUX VAE makes of a 256-px image);
* text encoder ``bench_inputs``: random ``max_length × dim`` states with ``real_tokens`` unmasked
  tokens per caption (2304-d, 256 tokens is T5-Gemma's shape), made once.

It also records the time after every optimizer step (``prx_after_optimizer_step``), which is how
``overhead.py`` times the trainer's own loop. :func:`install` makes the module an installed
distribution for this process (a ``.dist-info`` with a ``prx`` entry point in a temporary
directory on ``sys.path``), so recipes name it like any plugin; nothing is written into the venv.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo

NAME = "bench_inputs"
INFO = PluginInfo(
    name=NAME,
    summary="Benchmark inputs: a fixed random batch, identity latents and random text states at real sizes",
    spec="bench/README.md",
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    channels: int = 3
    size: int = 32
    #: "unit": images in [0, 1] (for the ``pixel`` latent space); "normal": N(0, 1) latents.
    values: Literal["unit", "normal"] = "unit"
    seed: int = 0


class FixedBatches:
    """One random batch per batch size, made once on the device: a data loader that costs nothing."""

    def __init__(self, config: DataConfig, device: Any) -> None:
        self.config = config
        self.device = device
        self.fingerprint = f"{NAME}:{config.channels}x{config.size}x{config.size}:{config.values}:seed={config.seed}"
        self._images: dict[int, Any] = {}

    def images(self, n: int) -> Any:
        import torch

        if n not in self._images:
            c = self.config
            generator = torch.Generator().manual_seed(c.seed)
            shape = (n, c.channels, c.size, c.size)
            draw = torch.rand if c.values == "unit" else torch.randn
            self._images[n] = draw(shape, generator=generator).to(self.device)
        return self._images[n]

    def batch(self, request: Any) -> Any:
        from prx_core.slots import RawBatch

        return RawBatch(images_BCHW=self.images(request.size), captions=captions(request.size))

    def held_out_captions(self, n: int) -> list[str]:
        return captions(n)

    def held_out(self, start: int, n: int) -> Any:
        from prx_core.slots import RawBatch

        return RawBatch(images_BCHW=self.images(n), captions=captions(n))


def captions(n: int) -> list[str]:
    """Distinct captions, so the text cache does what it does in training: one lookup per sample."""
    return [f"bench caption {i}" for i in range(n)]


# --------------------------------------------------------------------------- latent space


@dataclass(frozen=True)
class LatentConfig:
    channels: int = 16

    @property
    def spatial_compression(self) -> int:
        return 1


class IdentityLatents:
    spatial_compression = 1

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def encode(self, images_BCHW: Any, generator: Any = None) -> Any:
        return images_BCHW

    def decode(self, latents_BCHW: Any) -> Any:
        return latents_BCHW


# --------------------------------------------------------------------------- text encoder


@dataclass(frozen=True)
class TextConfig:
    dim: int = 2304
    max_length: int = 256
    #: Unmasked tokens per caption; the rest is padding (so attention gets a real mask).
    real_tokens: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.real_tokens <= self.max_length:
            raise ValueError("real_tokens must be in 1..max_length")


class FixedText:
    def __init__(self, config: TextConfig, device: Any, dtype: Any) -> None:
        import torch

        self.dim, self.max_length = config.dim, config.max_length
        generator = torch.Generator().manual_seed(1)
        self.states_1LD = torch.randn(1, config.max_length, config.dim, generator=generator).to(device, dtype)
        self.mask_1L = (torch.arange(config.max_length) < config.real_tokens)[None].to(device)
        self.empty_1LD = torch.zeros_like(self.states_1LD)
        self.empty_mask_1L = (torch.arange(config.max_length) < 1)[None].to(device)

    def encode(self, prompts: list[str]) -> tuple[Any, Any]:
        n = len(prompts)
        return self.states_1LD.expand(n, -1, -1), self.mask_1L.expand(n, -1)

    def empty(self) -> tuple[Any, Any]:
        return self.empty_1LD, self.empty_mask_1L


# --------------------------------------------------------------------------- hooks


@hookimpl
def prx_register_data_sources(registry: Any) -> None:
    registry.register(NAME, lambda config, run: FixedBatches(config, run.device), DataConfig)


@hookimpl
def prx_register_latent_spaces(registry: Any) -> None:
    registry.register(NAME, lambda config, run: IdentityLatents(config.channels), LatentConfig)


@hookimpl
def prx_register_text_encoders(registry: Any) -> None:
    def build(config: TextConfig, run: Any) -> FixedText:
        return FixedText(config, run.device, run.require("precision").frozen_dtype)

    registry.register(NAME, build, TextConfig)


#: The clock of the after-step timestamps: wall time, or ``time.process_time`` (see overhead.py).
CLOCK = time.perf_counter


@hookimpl
def prx_after_optimizer_step(run: Any, step: int) -> None:
    """Timestamps after each optimizer step (host clock; the benches that read them run on a CPU)."""
    run.plugin_state(NAME, list).append(CLOCK())


# --------------------------------------------------------------------------- harness


def install() -> Path:
    """Make this module an installed ``prx`` plugin for the current process; returns the site dir."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    site = Path(tempfile.mkdtemp(prefix="prx-bench-site-"))
    dist = site / "prx_bench-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: prx-bench\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text(f"[prx]\n{NAME} = prx_bench\n")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return site


def recipe(data: dict[str, Any], directory: Path) -> Any:
    """A validated :class:`prx_core.recipe.Recipe` from a dict (written as TOML, loaded as any recipe)."""
    from prx_core.recipe import dump_toml, load

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "recipe.toml"
    path.write_text(dump_toml(data), encoding="utf-8")
    return load(path)
