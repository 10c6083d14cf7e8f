"""Training-step throughput of prx against the bare diffusers step, at PRX-1.2B sizes.

    python bench/step_throughput.py --config 256 --batch 64              # GPU: PRX-1.2B, 256-px latents
    python bench/step_throughput.py --config 256 --batch 64 --compile    # the same, blocks compiled
    python bench/step_throughput.py --config pixel1024 --batch 16        # GPU: pixel space, 1024 px, patch 32
    python bench/step_throughput.py --tiny                               # CPU: tiny width, real token counts
    python bench/step_throughput.py --depth 1 --batch 1 --steps 1        # CPU: the real width, one block

Two rows, one after the other in the same process (so each gets the whole accelerator):

* ``prx``: the real training step, ``Trainer.train_step`` after ``Trainer.setup`` on a recipe built
  here: data, latent space and text encoder from the ``bench_inputs`` plugin (bench/prx_bench.py: a
  fixed random batch already on the device, identity latents, random text states with a padding
  mask), the builtin ``flow_matching`` objective, ``adamw`` (fused on CUDA) and ``bf16_mixed``
  precision (``fp32`` on a CPU), gradient clipping at 0.2: every hook, the block loop, the
  finiteness check, the scheduler.
* ``bare``: what a hand-written loop does with the same model and data:
  ``PRXTransformer2DModel.forward`` under the same autocast, MSE against the velocity target,
  backward, ``clip_grad_norm_`` (foreach), ``torch.optim.AdamW`` (fused on CUDA), t and noise drawn
  on the device.

Sizes (reference.md §1): ``256``: 16-channel 32×32 latents, patch 2 (256 image tokens); ``pixel1024``: RGB
1024×1024, patch 32, bottleneck 256 (1024 image tokens), timestep shift 3; both with 256 text tokens
of 2304 dims, 128 of them real. ``--tiny``: hidden 64, depth 2, 2 heads, 64-d text of 32 tokens,
same image token counts.

Reported per row: median step time, images/s, MFU from FLOPs counted by ``torch.utils.flop_counter``
on one real eager step (prx_core.throughput; not 6·N·tokens), peak accelerator memory (peak RSS on a
CPU), and the time of the first steps beyond the steady state (compile time with ``--compile``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common  # noqa: E402
import prx_bench  # noqa: E402

#: name -> model table, data table, latent space table, objective shift
CONFIGS: dict[str, dict[str, Any]] = {
    "256": {
        "model": {"in_channels": 16, "patch_size": 2},
        "data": {"channels": 16, "size": 32, "values": "normal"},
        "latent_space": {"use": prx_bench.NAME, "channels": 16},
        "shift": 1.0,
        "batch": 64,
    },
    "pixel1024": {
        "model": {"in_channels": 3, "patch_size": 32, "bottleneck_size": 256},
        "data": {"channels": 3, "size": 1024, "values": "unit"},
        "latent_space": {"use": "pixel"},
        "shift": 3.0,
        "batch": 16,
    },
}
TEXT = {"dim": 2304, "max_length": 256, "real_tokens": 128}
TINY_MODEL = {"hidden_size": 64, "depth": 2, "num_heads": 2, "axes_dim": [16, 16]}
TINY_TEXT = {"dim": 64, "max_length": 32, "real_tokens": 16}


def build_recipe(args: argparse.Namespace, device: torch.device, workdir: Path) -> Any:
    config = CONFIGS[args.config]
    model = dict(config["model"], **(TINY_MODEL if args.tiny else {}))
    if args.depth:
        model["depth"] = args.depth
    data: dict[str, Any] = {
        "name": f"step-throughput-{args.config}",
        "seed": 0,
        "model": model,
        "train": {
            "steps": 1_000_000,
            "global_batch": args.batch,
            "device": device.type,
            "grad_clip": 0.2,
            "compile": "blocks" if args.compile else "off",
            "count_flops": False,
            "log_every": 1_000_000,
            "checkpoint_every": 1_000_000,
        },
        "schedule": {"warmup_steps": 0},
        "optimizer": {"use": "adamw"},
        "precision": {"use": "bf16_mixed" if device.type == "cuda" else "fp32"},
        "objective": {"use": "flow_matching", "shift": config["shift"]},
        "data": {"use": prx_bench.NAME, **config["data"]},
        "latent_space": config["latent_space"],
        "text_encoder": {"use": prx_bench.NAME, **(TINY_TEXT if args.tiny else TEXT)},
        "eval": {"at_end": False},
    }
    return prx_bench.recipe(data, workdir)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    from prx_core.throughput import peak_memory_gb

    return peak_memory_gb(device)


#: Host clock of the timings: wall time, or this process's CPU time (``--clock process``, CPU only).
CLOCK = _common.clock("wall")


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> tuple[float, float, float]:
    """(seconds of the warm-up steps, median and best seconds per timed step)."""
    begin = CLOCK()
    for _ in range(warmup):
        step()
    _common.synchronize(device)
    warm = CLOCK() - begin
    times = []
    for _ in range(steps):
        begin = CLOCK()
        step()
        _common.synchronize(device)
        times.append(CLOCK() - begin)
    return warm, statistics.median(times), min(times)


def prx_row(recipe: Any, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from prx_core.throughput import count_step_flops
    from prx_core.trainer import Trainer

    trainer = Trainer(recipe, workdir / "run")
    trainer.setup()
    device = trainer.run.device
    flops = None
    if not args.compile:  # an eager count; compiled runs use the bare row's (counted before compiling)
        trainer.run.require("trainable").train()
        flops = count_step_flops(lambda: trainer.micro_step(0, 0)[0])
        trainer.optimizer.zero_grad(set_to_none=True)
    counter = iter(range(1 << 30))

    def step() -> None:
        trainer.train_step(next(counter))

    reset_peak(device)
    warm, median, best = time_steps(step, device, args.warmup, args.steps)
    row = {"flops": flops, "warm": warm, "median": median, "best": best, "peak": peak_gib(device)}
    row["params"] = sum(p.numel() for p in trainer.run.require("trainable").parameters())
    return row  # the trainer goes with this frame (the caller collects garbage before the next row)


def bare_row(recipe: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """PRXTransformer2DModel.forward + MSE + backward + clip + AdamW, inputs identical to prx's."""
    from prx_core.denoiser import build_model, compile_blocks
    from prx_core.throughput import count_step_flops

    data_cfg = recipe.slot_config("data")
    text_cfg = recipe.slot_config("text_encoder")
    torch.manual_seed(recipe.seed)  # the trainer's init: identical weights
    model = build_model(recipe.model, text_cfg.dim, torch.float32).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        params,
        lr=1e-4,
        betas=(0.9, 0.95),
        eps=1e-15,
        weight_decay=0.0,
        fused=fused or None,
        foreach=None if fused else True,
    )
    batch = args.batch
    generator = torch.Generator().manual_seed(data_cfg.seed)
    shape = (batch, data_cfg.channels, data_cfg.size, data_cfg.size)
    pixels = data_cfg.values == "unit"
    images = (torch.rand if pixels else torch.randn)(shape, generator=generator).to(device)
    text = torch.randn(1, text_cfg.max_length, text_cfg.dim, generator=torch.Generator().manual_seed(1))
    text = text.expand(batch, -1, -1).contiguous().to(device)
    mask = (torch.arange(text_cfg.max_length) < text_cfg.real_tokens)[None].expand(batch, -1).contiguous().to(device)
    empty = torch.zeros_like(text[:1])
    empty_mask = (torch.arange(text_cfg.max_length) < 1)[None].to(device)
    shift = recipe.slot_config("objective").shift
    autocast = device.type == "cuda"

    def loss() -> torch.Tensor:
        x0 = images * 2.0 - 1.0 if pixels else images  # "encode": the pixel space's [-1, 1], or latents as stored
        t = torch.sigmoid(torch.randn(batch, device=device))
        t = shift * t / (1 + (shift - 1) * t)
        drop = torch.rand(batch, device=device) < 0.1
        states = torch.where(drop[:, None, None], empty, text)
        keep = torch.where(drop[:, None], empty_mask, mask)
        noise = torch.randn_like(x0)
        t4 = t[:, None, None, None]
        x_t = (1 - t4) * x0 + t4 * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            prediction = model(x_t, t, states, attention_mask=keep).sample
        return torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())

    flops = count_step_flops(loss)  # eager, before any compilation
    optimizer.zero_grad(set_to_none=True)
    if args.compile:
        compile_blocks(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 0.2, foreach=True)
        optimizer.step()

    reset_peak(device)
    warm, median, best = time_steps(step, device, args.warmup, args.steps)
    row = {"flops": flops, "warm": warm, "median": median, "best": best, "peak": peak_gib(device)}
    row["params"] = sum(p.numel() for p in params)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="256")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 64 at 256, 16 at 1024)")
    parser.add_argument("--compile", action="store_true", help="train.compile = 'blocks' (and the same for bare)")
    parser.add_argument("--tiny", action="store_true", help="hidden 64, depth 2: a CPU run")
    parser.add_argument("--depth", type=int, default=None, help="override the depth (e.g. 1: full width on a CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--rows", default="prx,bare", help="which rows, comma-separated")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    parser.add_argument(
        "--clock", choices=("wall", "process"), default="wall", help="process: this process's CPU time (CPU only)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.clock == "process":
        if device.type == "cuda":
            raise SystemExit("--clock process measures host CPU time; use wall time on CUDA")
        global CLOCK
        CLOCK = _common.clock("process")
    args.batch = args.batch or (2 if args.tiny else CONFIGS[args.config]["batch"])
    prx_bench.install()
    from prx_core.throughput import peak_flops

    workdir = Path(tempfile.mkdtemp(prefix="prx-step-throughput-"))
    recipe = build_recipe(args, device, workdir)
    rows: dict[str, dict[str, Any]] = {}
    for name in args.rows.split(","):
        begin = time.perf_counter()
        if name == "prx":
            rows[name] = prx_row(recipe, workdir, args)
        elif name == "bare":
            rows[name] = bare_row(recipe, device, args)
        else:
            raise SystemExit(f"unknown row {name!r}; use prx and/or bare")
        rows[name]["total"] = time.perf_counter() - begin
        torch._dynamo.reset()  # each row compiles for itself (else the second reuses the first's graphs)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    counted = next((r["flops"] for r in rows.values() if r["flops"]), None)
    peak = peak_flops(device, args.peak_tflops)
    model = recipe.model
    side = recipe.slot_config("data").size
    tokens = (side // recipe.slot_config("latent_space").spatial_compression // model.patch_size) ** 2
    print("\n".join(_common.header(device)))
    params = next(iter(rows.values()))["params"]
    text = recipe.slot_config("text_encoder")
    print(
        f"model    : PRX hidden {model.hidden_size}, depth {model.depth}, {model.num_heads} heads "
        f"({params / 1e6:.1f}M params), config '{args.config}'{' (tiny)' if args.tiny else ''}: "
        f"{model.in_channels}-ch {side}x{side} input, patch {model.patch_size}, {tokens} image tokens, "
        f"{text.max_length} text tokens of {text.dim} dims ({text.real_tokens} real)"
    )
    print(
        f"step     : batch {args.batch}, precision {recipe.slots['precision'].use}, "
        f"compile {'blocks' if args.compile else 'off'}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.clock} clock"
    )
    flops_text = ", ".join(f"{k} {v['flops'] / 1e9:.4g}" for k, v in rows.items() if v["flops"])
    print(f"flops    : counted per step (forward + backward), GFLOP: {flops_text or 'not counted (compiled)'}")
    if args.compile and "bare" in rows:
        print("           (compiled rows use the bare model's eager count: the same arithmetic)")
    print()
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    print(
        f"{'row':<5} {'median ms':>10} {'best ms':>9} {'images/s':>9} {'TFLOP/s':>9} {'MFU':>6} {memory:>12} "
        f"{'warm-up s':>10} {'vs bare':>8}"
    )
    for name, row in rows.items():
        flops = row["flops"] or counted
        tflops = flops / row["median"] / 1e12 if flops else None
        mfu = f"{flops / row['median'] / peak:.1%}" if flops and peak else "n/a"
        ratio = f"{rows['bare']['median'] / row['median']:.3f}x" if "bare" in rows else "n/a"
        print(
            f"{name:<5} {row['median'] * 1e3:>10.1f} {row['best'] * 1e3:>9.1f} {args.batch / row['median']:>9.1f} "
            f"{(f'{tflops:.4g}' if tflops else 'n/a'):>9} {mfu:>6} {row['peak']:>12.2f} {row['warm']:>10.1f} "
            f"{ratio:>8}"
        )
    print()
    print(
        f"warm-up s: {args.clock} time of the warm-up steps (with --compile mostly compilation); "
        "vs bare: bare median / row median (< 1: prx slower)"
    )


if __name__ == "__main__":
    main()
