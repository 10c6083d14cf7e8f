"""What the prx trainer costs per step on top of a bare PyTorch loop (CPU, the quickstart's model).

    python bench/overhead.py                                  # 2 threads, wall clock
    python bench/overhead.py --threads 1 --clock process      # a shared CPU: count only our own work

Both sides train the same model from the same initial weights on the same fixed batch:

* ``prx``: ``Trainer.fit`` with everything a run has per step: the plugin manager and its hooks
  (objective, loss terms, after-step hooks), the block loop and its seams, caption dropout with the
  cached empty prompt, the text cache, timesteps and noise from the per-step generators, the
  finiteness check, clipping, the schedule, the console tracker and metrics.jsonl every
  ``--log-every`` steps. Data, latent space and text encoder come from the ``bench_inputs`` plugin
  (bench/prx_bench.py): one fixed random batch, so no data loading is timed on either side.
  Checkpoints, sample grids and the export at the end of each ``fit`` call are switched off (they
  are periodic, not per-step work) and ``count_flops`` is off (once per run).
* ``bare``: a hand-written loop: ``PRXTransformer2DModel.forward``, MSE against the velocity
  target, logit-normal t, caption dropout, ``clip_grad_norm_``, foreach AdamW, a LambdaLR warm-up,
  and the loss read back (``.item()``) and logged every ``--log-every`` steps.

The model is the quickstart's (hidden 128, depth 4, 2 heads, patch 4 on 32-px RGB: 64 image tokens;
24 text tokens of 384 dims, 12 real; batch 32 unless ``--batch``; fp32). Repetitions interleave a chunk of ``--chunk``
steps of each side (alternating which goes first); a chunk's per-step time is (last - first
timestamp) / (steps - 1), timestamps taken after each optimizer step (prx: by the ``bench_inputs``
plugin's ``prx_after_optimizer_step`` hook), so ``fit``'s start-up is not counted but everything
between two steps is. The table gives the median over repetitions, and the overhead
median(prx) / median(bare) - 1 next to the median of the per-repetition ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common  # noqa: E402
import prx_bench  # noqa: E402

MODEL = {"in_channels": 3, "patch_size": 4, "hidden_size": 128, "num_heads": 2, "axes_dim": [32, 32], "depth": 4}
TEXT = {"dim": 384, "max_length": 24, "real_tokens": 12}
SIZE, LR, WARMUP, CLIP = 32, 1e-3, 100, 0.2


def build_recipe(batch: int, log_every: int, workdir: Path) -> Any:
    return prx_bench.recipe(
        {
            "name": "overhead",
            "seed": 0,
            "model": MODEL,
            "train": {
                "steps": 1,
                "global_batch": batch,
                "device": "cpu",
                "grad_clip": CLIP,
                "log_every": log_every,
                "checkpoint_every": 1_000_000,
                "count_flops": False,
            },
            "schedule": {"warmup_steps": WARMUP},
            "optimizer": {"use": "adamw", "lr": LR},
            "precision": {"use": "fp32"},
            "objective": {"use": "flow_matching"},
            "data": {"use": prx_bench.NAME, "channels": 3, "size": SIZE, "values": "unit"},
            "latent_space": {"use": "pixel"},
            "text_encoder": {"use": prx_bench.NAME, **TEXT},
            "eval": {"at_end": False},
        },
        workdir,
    )


def prx_side(recipe: Any, workdir: Path) -> Callable[[int], list[float]]:
    from prx_core.trainer import Trainer

    class ChunkedTrainer(Trainer):
        """``fit`` in chunks: the end-of-run work (grid, checkpoint, export) is not per-step work."""

        def write_samples(self, step: int) -> Path | None:
            return None

        def save(self) -> Any:
            return None

        def _export(self) -> None:
            return None

    trainer = ChunkedTrainer(recipe, workdir / "run")
    trainer.setup()
    stamps: list[float] = trainer.run.plugin_state(prx_bench.NAME, list)

    def chunk(steps: int) -> list[float]:
        trainer.recipe.train = dataclasses.replace(trainer.recipe.train, steps=trainer.step + steps)
        del stamps[:]
        trainer.fit()
        return list(stamps)

    return chunk


def bare_side(recipe: Any, clock: Callable[[], float], log_every: int) -> Callable[[int], list[float]]:
    batch = recipe.train.global_batch
    from prx_core.denoiser import build_model

    log = logging.getLogger("bare")
    torch.manual_seed(recipe.seed)  # the trainer's init: identical weights
    model = build_model(recipe.model, TEXT["dim"], torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP))
    images = prx_bench.FixedBatches(recipe.slot_config("data"), torch.device("cpu")).images(batch)
    text = prx_bench.FixedText(recipe.slot_config("text_encoder"), torch.device("cpu"), torch.float32)
    states, mask = text.states_1LD.expand(batch, -1, -1), text.mask_1L.expand(batch, -1)
    step_count = 0
    loss_sum = torch.zeros(())

    def chunk(steps: int) -> list[float]:
        nonlocal step_count, loss_sum
        stamps = []
        for _ in range(steps):
            x0 = images * 2 - 1
            t = torch.sigmoid(torch.randn(batch))
            drop = torch.rand(batch) < 0.1
            cond = torch.where(drop[:, None, None], text.empty_1LD, states)
            keep = torch.where(drop[:, None], text.empty_mask_1L, mask)
            noise = torch.randn_like(x0)
            x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            prediction = model(x_t, t, cond, attention_mask=keep).sample
            loss = torch.nn.functional.mse_loss(prediction, noise - x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            step_count += 1
            if step_count % log_every == 0:
                log.info("step %d loss=%.4g", step_count, loss_sum.item() / log_every)
                loss_sum = torch.zeros(())
            stamps.append(clock())
        return stamps

    return chunk


def per_step(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repetitions (chunks of each side)")
    parser.add_argument("--chunk", type=int, default=30, help="steps per chunk")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps of each side first")
    parser.add_argument("--log-every", type=int, default=10, help="both sides log the loss every N steps")
    parser.add_argument("--batch", type=int, default=32, help="32 (the quickstart); small ones expose host overhead")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = _common.clock(args.clock)
    prx_bench.install()  # the plugin manager imports this same module (bench/ is on sys.path)
    prx_bench.CLOCK = clock
    workdir = Path(tempfile.mkdtemp(prefix="prx-overhead-"))
    # Both sides' log lines are really formatted and written (to a file: they would flood the terminal).
    logging.basicConfig(level=logging.INFO, filename=workdir / "log.txt")
    recipe = build_recipe(args.batch, args.log_every, workdir)
    sides = {"prx": prx_side(recipe, workdir), "bare": bare_side(recipe, clock, args.log_every)}
    for run_chunk in sides.values():
        run_chunk(args.warmup)
    times: dict[str, list[float]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            times[name].append(per_step(sides[name](args.chunk)))
    from prx_core.denoiser import build_model

    prx, bare = statistics.median(times["prx"]), statistics.median(times["bare"])
    paired = statistics.median(p / b for p, b in zip(times["prx"], times["bare"], strict=True))

    print("\n".join(_common.header(torch.device("cpu"))))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model(recipe.model, TEXT["dim"], torch.float32).parameters())
    print(
        f"model    : quickstart PRX (hidden 128, depth 4, 2 heads, {n_params / 1e6:.2f}M params), 32-px RGB, patch 4 "
        f"(64 tokens), text 24 x 384 (12 real), batch {args.batch}, fp32"
    )
    print(
        f"timing   : {args.clock} clock, {args.repeats} interleaved repetitions of {args.chunk} steps per side "
        f"after {args.warmup} warm-up steps; loss logged every {args.log_every} steps on both sides"
    )
    print()
    print(f"{'side':<5} {'median ms/step':>15} {'best ms/step':>13} {'worst ms/step':>14}")
    for name, values in times.items():
        print(
            f"{name:<5} {statistics.median(values) * 1e3:>15.2f} {min(values) * 1e3:>13.2f} {max(values) * 1e3:>14.2f}"
        )
    print()
    print(f"overhead : {prx / bare - 1:+.2%} (median prx / median bare - 1), {(prx - bare) * 1e3:+.2f} ms/step")
    print(f"           {paired - 1:+.2%} (median of the per-repetition ratios - 1)")


if __name__ == "__main__":
    main()
