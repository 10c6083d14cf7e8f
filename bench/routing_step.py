"""Step time of the denoiser with and without token routing (TREAD, SPRINT), at 256 and 1024 tokens.

    python bench/routing_step.py --tiny        # about a minute on 2 CPU cores: hidden 64, depth 6
    python bench/routing_step.py               # a small PRX: hidden 512, depth 8 (GPU, or patient CPU)
    python bench/routing_step.py --full        # the real PRX-1.2B shapes (hidden 1792, depth 16), for a GPU

One step is the forward and backward of the trainer's block loop (``prx_core.denoiser.denoise``,
the same code a training step runs, with the routers' enter/exit seams) on random latents, text
and timesteps, loss = mean(out²). Parameters are random (PRX zero-initialises its modulation and
final layer, which would make the backward trivial). Rows, side by side in one run:

* ``none``                 no router: every token runs every block
* ``tread p=0.5``          TREAD, half the image tokens skip blocks start..end (reference.md §4)
* ``sprint p=0.75``        SPRINT, three quarters skip, plus the Linear 2H→H fusion after ``end``

The routers are built the way a run builds them: through the ``prx`` entry points and the
router registry (``[router] use = "tread"``), and SPRINT's fusion through its
``prx_build_modules`` hook; the bench imports neither plugin module. Variants take turns, one
step each per round, so a noisy neighbour slows them alike. ``speed-up`` is the unrouted median
divided by the row's median (> 1: faster). On CUDA the steps run under bf16 autocast (the default
``bf16_mixed`` policy); on a CPU in fp32 (the quickstart's policy: CPUs without bf16 units are
slower under autocast).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from _common import header, time_interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prx_core.context import ForwardContext  # noqa: E402
from prx_core.denoiser import build_model, denoise  # noqa: E402
from prx_core.keys import Stash  # noqa: E402
from prx_core.plugins import activate  # noqa: E402
from prx_core.recipe import ModelConfig  # noqa: E402
from prx_core.seeding import generator_for  # noqa: E402

#: name -> (hidden, depth, heads, axes_dim, text_dim, text_len, batch)
PRESETS: dict[str, tuple[int, int, int, tuple[int, int], int, int, int]] = {
    "tiny": (64, 6, 2, (16, 16), 64, 16, 1),
    "small": (512, 8, 8, (32, 32), 512, 128, 4),
    "full": (1792, 16, 28, (32, 32), 2304, 256, 4),
}
#: 16-channel latents with patch 2 (FLUX VAE, reference.md §1): 32×32 latents are 256 tokens, 64×64 are 1024.
LATENT_CHANNELS, PATCH = 16, 2
TOKEN_COUNTS = (256, 1024)


def default_span(depth: int) -> tuple[int, int]:
    """reference.md §4's span 2..12 of 16 blocks, scaled to ``depth``."""
    return max(0, round(2 * depth / 16)), min(depth - 1, round(12 * depth / 16))


def build_router(name: str, start: int, end: int, ratio: float, run: Any) -> tuple[Any, dict[str, torch.nn.Module]]:
    """The router and its extra modules, through the plugin system as a run builds them."""
    active = activate({"router": name}, [])
    entry = active.registries["router"].get(name)
    router = entry.factory(entry.config(start=start, end=end, ratio=ratio), run)
    run.router = router
    extras: dict[str, torch.nn.Module] = {}
    plugin = active.manager.get_plugin(name)
    build = getattr(plugin, "prx_build_modules", None)
    if build is not None:
        extras.update(build(run=run) or {})
    return router, extras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="hidden 64, depth 6, batch 1: a quick CPU run")
    size.add_argument("--full", action="store_true", help="the real PRX-1.2B shapes (GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (preset default)")
    parser.add_argument(
        "--start", type=int, default=None, help="first routed block (default: 2/16 of depth, as published)"
    )
    parser.add_argument(
        "--end", type=int, default=None, help="last routed block (default: 12/16 of depth, as published)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each variant one step per round)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (steadier on a shared CPU; not for CUDA)",
    )
    args = parser.parse_args()
    if args.clock == "process" and args.device != "cpu" and torch.cuda.is_available():
        raise SystemExit("--clock process measures host CPU time; use it with --device cpu")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    preset = "tiny" if args.tiny else "full" if args.full else "small"
    hidden, depth, heads, axes, text_dim, text_len, batch = PRESETS[preset]
    batch = args.batch or batch
    start, end = default_span(depth)
    start = start if args.start is None else args.start
    end = end if args.end is None else args.end

    torch.manual_seed(0)
    config = ModelConfig(
        in_channels=LATENT_CHANNELS,
        patch_size=PATCH,
        hidden_size=hidden,
        num_heads=heads,
        depth=depth,
        axes_dim=axes,
        context_in_dim=text_dim,
    )
    model = build_model(config, text_dim, torch.float32)
    with torch.no_grad():  # random weights everywhere (see the module docstring)
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.to(device)
    run = SimpleNamespace(
        recipe=SimpleNamespace(model=config, seed=0),
        router=None,
        precision=SimpleNamespace(param_dtype=torch.float32),
        logger=None,
    )
    run.require = lambda what: getattr(run, what)
    variants: dict[str, tuple[Any, dict[str, torch.nn.Module]]] = {"none": (None, {})}
    variants["tread p=0.5"] = build_router("tread", start, end, 0.5, run)
    variants["sprint p=0.75"] = build_router("sprint", start, end, 0.75, run)
    for _, extras in variants.values():
        for module in extras.values():
            module.to(device)

    autocast: Callable[[], AbstractContextManager[Any]] = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    )
    counter = iter(range(1 << 30))

    def make_step(tokens: int, router: Any, extras: dict[str, torch.nn.Module]) -> Callable[[], None]:
        side = int(tokens**0.5) * PATCH
        gen = torch.Generator().manual_seed(tokens)
        x = torch.randn(batch, LATENT_CHANNELS, side, side, generator=gen).to(device)
        t = torch.rand(batch, generator=gen).to(device)
        text = torch.randn(batch, text_len, text_dim, generator=gen).to(device)
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        mask[:, text_len // 2 :] = False  # padded captions, as in training
        mask = mask.to(device)
        params = [*model.parameters(), *(p for m in extras.values() for p in m.parameters())]

        def step() -> None:
            ctx = ForwardContext(
                stash=Stash(), generator=generator_for(0, "route", next(counter)), training=True, extras=extras
            )
            with autocast():
                out = denoise(model, x, t, text, mask, ctx, router=router)
            out.float().square().mean().backward()
            for p in params:
                p.grad = None

        return step

    results: dict[tuple[int, str], tuple[float, float]] = {}
    peak: dict[tuple[int, str], float] = {}
    for tokens in TOKEN_COUNTS:
        steps = {label: make_step(tokens, r, e) for label, (r, e) in variants.items()}

        def record_peak(label: str, tokens: int = tokens) -> None:
            if device.type == "cuda":
                peak[(tokens, label)] = torch.cuda.max_memory_allocated(device) / 2**30

        timed = time_interleaved(steps, device, args.warmup, args.steps, args.clock, on_warm=record_peak)
        for label, value in timed.items():
            results[(tokens, label)] = value

    n_params = sum(p.numel() for p in model.parameters())
    for line in header(device):
        print(line)
    print(
        f"model    : PRX hidden {hidden}, depth {depth}, {heads} heads ({n_params / 1e6:.1f}M params, preset "
        f"'{preset}'), batch {batch}, text {text_len} tokens ({text_len // 2} real)"
    )
    print(f"routing  : blocks {start}..{end} of 0..{depth - 1} ({end - start + 1}/{depth} blocks routed)")
    print(f"precision: {'bf16 autocast, fp32 weights' if device.type == 'cuda' else 'fp32'}")
    print(
        f"timing   : forward+backward, {args.clock} clock, {args.steps} interleaved rounds after {args.warmup} "
        "warm-up steps each"
    )
    print()
    memory = device.type == "cuda"
    columns = f"{'tokens':>6} {'variant':<15} {'median ms':>10} {'best ms':>9} {'speed-up':>9}"
    print(columns + (f" {'peak GiB':>9}" if memory else ""))
    for tokens in TOKEN_COUNTS:
        base = results[(tokens, "none")][0]
        for label in variants:
            median, best = results[(tokens, label)]
            line = f"{tokens:>6} {label:<15} {median:>10.1f} {best:>9.1f} {base / median:>8.2f}x"
            print(line + (f" {peak[(tokens, label)]:>9.2f}" if memory else ""))
    print()
    print("speed-up: the unrouted ('none') median at the same token count / this row's median (> 1: faster)")


if __name__ == "__main__":
    main()
