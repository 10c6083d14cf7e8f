"""Evaluation: validation loss per timestep bin and the recipe's metrics (reference.md §3, §6).

Every rank takes a strided share of the held-out items (captions and real images), generates
its images with per-item seeded noise, and computes metric features; rank 0 scores the gathered
features. Results are keyed ``eval/loss/t<lo>-<hi>``, ``eval/loss`` and ``eval/<metric>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from prx_core.context import ForwardContext, StepContext
from prx_core.distributed import reshard
from prx_core.flow import interpolate
from prx_core.keys import Stash
from prx_core.seeding import generator_for
from prx_core.slots import RawBatch

if TYPE_CHECKING:
    from prx_core.trainer import Trainer


def _concat(batches: list[RawBatch]) -> RawBatch:
    """One batch from several; an encoding is kept only when every part has it."""

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in batches]
        return torch.cat(parts) if all(p is not None for p in parts) else None

    text, mask = cat("text_BLD"), cat("mask_BL")
    latents, std = cat("latents_BCHW"), cat("latent_std_BCHW")
    return RawBatch(
        images_BCHW=cat("images_BCHW"),
        captions=[c for b in batches for c in b.captions],
        latents_BCHW=latents,
        latent_std_BCHW=std if latents is not None else None,
        text_BLD=text if mask is not None else None,
        mask_BL=mask if text is not None else None,
    )


def _chunks(trainer: Trainer, mine: list[int], batch: int) -> list[tuple[list[int], bool]]:
    """``mine`` in chunks of ``batch``, as ``(indices, counted)``, padded to the same count on every rank.

    Sharded (FSDP2) weights are all-gathered inside each forward, a collective every rank must
    join: when the held-out items do not split evenly, a rank with fewer chunks would leave the
    others waiting forever. Padding chunks repeat held-out item 0 and are computed but not counted.
    """
    from prx_core.distributed import is_sharded

    chunks = [(mine[start : start + batch], True) for start in range(0, len(mine), batch)]
    if not trainer.dist.active or not is_sharded(trainer.run.require("trainable")):
        return chunks
    most_items = -(-trainer.recipe.eval.num_samples // trainer.dist.world_size)  # rank 0's share
    padding = -(-most_items // batch) - len(chunks)
    return chunks + [([0], False)] * padding


def _gather_rows(trainer: Trainer, rows: list[torch.Tensor]) -> torch.Tensor | None:
    """Concatenate every rank's feature rows on rank 0 (None elsewhere), in rank order."""
    local = torch.cat(rows) if rows else torch.zeros(0)
    if not trainer.dist.active:
        return local
    gathered: list[Any] = [None] * trainer.dist.world_size
    dist.all_gather_object(gathered, local.cpu())
    return torch.cat([g for g in gathered if g.numel()]) if trainer.dist.is_main else None


@torch.no_grad()
def validation_loss(trainer: Trainer, indices: list[int], seed: int | None = None) -> dict[str, float]:
    """Objective loss on held-out images at fixed t per bin, fixed noise per item (drawn from
    ``seed``, by default ``eval.seed``)."""
    from prx_core.towers import batch_encodings

    run, ev = trainer.run, trainer.recipe.eval
    seed = ev.seed if seed is None else seed
    objective, precision = run.require("objective"), run.require("precision")
    data = run.require("data")
    sums = torch.zeros(ev.t_bins, dtype=torch.float64)
    count = 0
    # The weights samples and metrics use: the EMA copy when EMA is on (reference.md §4).
    modules = trainer.sampling_modules()
    for chunk, counted in _chunks(trainer, indices, ev.batch):
        # Held-out items may carry their encodings (precomputed data): the towers then stay unloaded.
        raw = _concat([data.held_out(i, 1) for i in chunk])
        images_BCHW = raw.images_BCHW.to(run.device) if raw.images_BCHW is not None else None
        x0, text, mask = batch_encodings(raw, run, None)
        noise = torch.stack(
            [torch.randn(x0.shape[1:], generator=generator_for(seed, "val", i), dtype=x0.dtype) for i in chunk]
        ).to(run.device)
        for b in range(ev.t_bins):
            t_B = torch.full((len(chunk),), (b + 0.5) / ev.t_bins, device=run.device)
            x_t = interpolate(x0, noise, t_B)
            stash = Stash()
            ctx = ForwardContext(stash=stash, generator=None, training=False, extras=modules.extras)
            with precision.autocast(run.device):
                prediction = trainer.predict(modules, x_t, t_B, text, mask, ctx)
            step = StepContext(
                run=run,
                step=trainer.step,
                micro_step=0,
                images_BCHW=images_BCHW,
                x0_BCHW=x0,
                noise_BCHW=noise,
                t_B=t_B,
                x_t_BCHW=x_t,
                text_BLD=text,
                mask_BL=mask,
                stash=stash,
                generator=generator_for(seed, "val-step"),
                prediction_BCHW=prediction,
            )
            if counted:
                sums[b] += objective.loss(step, prediction).double().sum().cpu()
        count += len(chunk) if counted else 0
    totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
    if trainer.dist.active:
        dist.all_reduce(totals)
    per_bin = totals[:-1] / totals[-1]
    out = {}
    for b in range(ev.t_bins):
        lo, hi = b / ev.t_bins, (b + 1) / ev.t_bins
        out[f"eval/loss/t{lo:.2f}-{hi:.2f}"] = float(per_bin[b])
    out["eval/loss"] = float(per_bin.mean())
    return out


def metric_objects(trainer: Trainer) -> dict[str, Any]:
    """The recipe's metrics, built once per run (Inception, CLIP and DINO are not reloaded every
    evaluation). The trainer calls this at setup when evaluation is on, so missing metric weights
    fail the run at start, not at its first evaluation hours later."""
    run = trainer.run
    registry = run.recipe.active.registries["metric"]

    def build(name: str, config: Any) -> Callable[[], Any]:
        return lambda: registry.get(name).factory(config, run)

    return {
        name: run.plugin_state(f"metric:{name}", build(name, choice.config))
        for name, choice in sorted(trainer.recipe.metrics.items())
    }


def evaluate(trainer: Trainer, seed: int | None = None) -> dict[str, float]:
    """The validation loss and the recipe's metrics. ``seed`` replaces ``eval.seed`` for the
    validation noise and the generated images (``prx-run eval --repeat`` measures evaluation noise
    with it); by default the evaluation is the recipe's, identical at every call."""
    run, recipe = trainer.run, trainer.recipe
    ev = recipe.eval
    seed = ev.seed if seed is None else seed
    rank, world = trainer.dist.rank, trainer.dist.world_size
    mine = list(range(rank, ev.num_samples, world))
    was_training = run.require("trainable").training
    run.require("trainable").eval()
    results = validation_loss(trainer, mine, seed)
    metrics = metric_objects(trainer)
    if metrics:
        data = run.require("data")
        size = trainer.sample_size()
        generated: dict[str, list[torch.Tensor]] = {n: [] for n in metrics}
        reference: dict[str, list[torch.Tensor]] = {n: [] for n in metrics}
        for chunk, counted in _chunks(trainer, mine, ev.batch):
            batches = [data.held_out(i, 1) for i in chunk]
            prompts = [c for b in batches for c in b.captions]
            real = torch.cat([b.images_BCHW for b in batches])
            images = trainer.generate(prompts, ev.steps, ev.cfg, seed, size, noise_indices=chunk)
            if not counted:  # a padding chunk: its forward kept the ranks' collectives matched
                continue
            for name, metric in metrics.items():
                generated[name].append(metric.features(images, prompts).float().cpu())
                if metric.needs_reference:
                    reference[name].append(metric.features(real, prompts).float().cpu())
        for name, metric in metrics.items():
            gen = _gather_rows(trainer, generated[name])
            ref = _gather_rows(trainer, reference[name]) if metric.needs_reference else None
            if gen is not None:
                results.update({f"eval/{k}": float(v) for k, v in metric.score(gen, ref).items()})
    run.require("trainable").train(was_training)
    reshard(trainer.forward_module)
    return results
