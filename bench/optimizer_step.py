"""Time one optimizer step on the PRX-1.2B parameter shapes: prx's Muon against torch.optim.Muon and AdamW.

    python bench/optimizer_step.py                 # CPU default: shapes scaled down 4× (hidden 448, depth 4)
    python bench/optimizer_step.py --full          # the real PRX-1.2B shapes (hidden 1792, depth 16), for a GPU
    python bench/optimizer_step.py --scale 2 --steps 5

Shapes come from ``diffusers.PRXTransformer2DModel`` built on the meta device (no memory, no
weights), with hidden size and depth divided by ``--scale`` (head dim stays 64). Parameters and
gradients are random fp32 tensors on the chosen device; every candidate steps the same tensors,
all candidates are built up front (state of about 8× the fp32 parameter bytes in total, 37 GB
for the full shapes), take turns step by step, and the table reports each one's median and best step
times over ``--steps`` rounds after ``--warmup`` untimed steps.

Candidates, on the same two parameter sets as the reference setup (reference.md §4: Muon for the 2-D
block weights, AdamW for the rest):

* ``prx muon (blocks)``       prx_muon.MuonAdamW, Muon group only, as a run uses it (``ns_max_batch = "auto"``:
                              whole same-shape batches on a GPU, one matrix at a time on a CPU)
* ``prx muon, batched NS``    the same, every same-shape batch in one matmul per term
* ``prx muon, 1-at-a-time NS``  the same, one matrix per matmul (batched vs this: what batching buys)
* ``torch.optim.Muon (blocks)`` torch's Muon, one matrix at a time (``match_rms_adamw`` scaling)
* ``prx muon+adamw (all)``    the whole prx optimizer as a run uses it
* ``torch Muon + AdamW (all)`` torch.optim.Muon on the blocks plus torch AdamW on the rest
* ``AdamW (all)``             torch AdamW on every weight (fused on CUDA, foreach elsewhere)

Both Muons run Newton–Schulz in bf16. The ratio column is torch.optim.Muon's time on the same
parameter set divided by the row's time (> 1: faster than torch.optim.Muon).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from _common import header, synchronize, time_interleaved  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PRX_HIDDEN, PRX_DEPTH, PRX_HEADS = 1792, 16, 28


def prx_shapes(scale: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every PRX-1.2B parameter, hidden and depth divided by ``scale``."""
    from diffusers import PRXTransformer2DModel

    if PRX_HIDDEN % (64 * scale) or PRX_DEPTH % scale:
        raise SystemExit(f"--scale {scale} must divide hidden {PRX_HIDDEN} into 64-wide heads and depth {PRX_DEPTH}")
    with torch.device("meta"):
        model = PRXTransformer2DModel(
            hidden_size=PRX_HIDDEN // scale, depth=PRX_DEPTH // scale, num_heads=PRX_HEADS // scale
        )
    return [(f"model.{n}", tuple(p.shape)) for n, p in model.named_parameters()]


def make_parameters(
    shapes: list[tuple[str, tuple[int, ...]]], device: torch.device
) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator(device=device).manual_seed(0)
    named = []
    for name, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator, device=device) * 0.02)
        p.grad = torch.randn(shape, generator=generator, device=device) * 1e-3
        named.append((name, p))
    return named


def with_max_batch(optimizer: torch.optim.Optimizer, max_batch: int | None) -> torch.optim.Optimizer:
    """The same optimizer with Newton–Schulz batches capped at ``max_batch`` matrices (None: whole groups)."""
    optimizer.ns_max_batch = max_batch  # type: ignore[attr-defined]
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="real PRX-1.2B shapes (same as --scale 1)")
    parser.add_argument("--scale", type=int, default=None, help="divide hidden size and depth by this (CPU default 4)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall time, or this process's CPU time (robust on a shared CPU with --threads 1; not for CUDA)",
    )
    args = parser.parse_args()

    from prx_muon import MuonConfig, build_optimizer
    from prx_muon.grouping import split_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    scale = 1 if args.full else (args.scale or (1 if device.type == "cuda" else 4))
    named = make_parameters(prx_shapes(scale), device)
    config = MuonConfig()
    muon_named, adamw_named = split_parameters(named, config.muon_patterns, config.exclude_patterns)
    blocks = [p for _, p in muon_named]
    rest = [p for _, p in adamw_named]
    everything = [p for _, p in named]
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731

    fused = device.type == "cuda"

    def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=1e-4, betas=(0.9, 0.95), eps=1e-15, fused=fused or None, foreach=None if fused else True
        )

    def torch_muon(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Muon(params, lr=1e-4, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")

    def both(*optimizers: torch.optim.Optimizer) -> Callable[[], None]:
        def step() -> None:
            for optimizer in optimizers:
                optimizer.step()

        return step

    def capped(max_batch: int | None) -> Callable[[], None]:
        return with_max_batch(build_optimizer(muon_named, config), max_batch).step

    has_torch_muon = hasattr(torch.optim, "Muon")
    candidates: list[tuple[str, str, Callable[[], Callable[[], None]]]] = [
        ("prx muon (blocks)", "blocks", lambda: build_optimizer(muon_named, config).step),
        ("prx muon, batched NS (blocks)", "blocks", lambda: capped(None)),
        ("prx muon, 1-at-a-time NS (blocks)", "blocks", lambda: capped(1)),
    ]
    if has_torch_muon:
        candidates.append(("torch.optim.Muon (blocks)", "blocks", lambda: torch_muon(blocks).step))
    candidates.append(("prx muon+adamw (all)", "all", lambda: build_optimizer(named, config).step))
    if has_torch_muon:
        candidates.append(("torch Muon + AdamW (all)", "all", lambda: both(torch_muon(blocks), adamw(rest))))
    candidates.append((f"AdamW {'fused' if fused else 'foreach'} (all)", "all", lambda: adamw(everything).step))

    if args.clock == "process" and device.type == "cuda":
        raise SystemExit("--clock process measures host CPU time; use --clock wall on CUDA")
    results = time_interleaved(
        {label: build() for label, _, build in candidates}, device, args.warmup, args.steps, args.clock
    )

    reference = {
        "blocks": results.get("torch.optim.Muon (blocks)"),
        "all": results.get("torch Muon + AdamW (all)"),
    }
    hidden, depth = PRX_HIDDEN // scale, PRX_DEPTH // scale
    for line in header(device):
        print(line)
    print(
        f"shapes   : PRX-1.2B / {scale} (hidden {hidden}, depth {depth}): {len(blocks)} block matrices "
        f"({count(blocks) / 1e6:.1f}M) on Muon, {len(rest)} other tensors ({count(rest) / 1e6:.1f}M) on AdamW"
    )
    print(f"timing   : {args.clock} clock, {args.steps} interleaved rounds after {args.warmup} warm-up steps")
    print("dtypes   : fp32 weights, grads and state; Newton-Schulz in bf16 (both Muons)")
    print()
    print(f"{'optimizer':<34} {'params':>8} {'median ms':>10} {'best ms':>9} {'vs torch.optim.Muon':>20}")
    for label, which, _ in candidates:
        median, best = results[label]
        ref = reference[which]
        ratio = f"{ref[0] / median:.2f}x" if ref else "n/a"
        n = count(blocks) if which == "blocks" else count(everything)
        print(f"{label:<34} {n / 1e6:>7.1f}M {median:>10.1f} {best:>9.1f} {ratio:>20}")
    print()
    print("ratio: torch.optim.Muon's median time on the same parameter set / this row's (> 1: faster)")
    # One line for bench/gpu_check.sh's summary block.
    rows = [f"{label} {results[label][0]:.1f} ms" for label, _, _ in candidates]
    print("summary optimizer: " + "; ".join(rows))


if __name__ == "__main__":
    main()
