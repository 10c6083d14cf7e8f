"""Tracker ``console``: a progress bar on a terminal, periodic log lines otherwise.

Every run also writes ``metrics.jsonl`` in its run directory, whatever the tracker (core does
that, so the record exists with Aim or any other tracker too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prx_core import hookimpl
from prx_core.hookspecs import PluginInfo


@dataclass(frozen=True)
class ConsoleConfig:
    #: "auto": a progress bar when stderr is a terminal, plain log lines otherwise (CI, files).
    progress: Literal["auto", "bar", "lines"] = "auto"


class ConsoleTracker:
    def __init__(self, config: ConsoleConfig, logger: Any) -> None:
        import sys

        self.logger = logger
        self.use_bar = config.progress == "bar" or (config.progress == "auto" and sys.stderr.isatty())
        self.bar: Any = None

    def start(self, hparams: dict[str, Any], total_steps: int, first_step: int) -> None:
        if self.use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc=str(hparams.get("name", "train")), unit="step")

    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None:
        if context:  # evaluation results: one line each, whatever the display
            where = ",".join(f"{k}={v}" for k, v in sorted(context.items()))
            text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            message = f"step {step} [{where}] {text}"
            if self.bar is not None:
                self.bar.write(message)
            else:
                self.logger.info(message)
            return
        shown = {k: v for k, v in metrics.items() if k in ("loss", "lr", "grad_norm", "steps_per_s")}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        else:
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            self.logger.info("step %d %s", step, text)

    def log_image(self, name: str, path: str, step: int) -> None:
        message = f"step {step}: wrote {name} -> {path}"
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.logger.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


INFO = PluginInfo(
    name="console", summary="Progress bar on a terminal, log lines otherwise", spec="reference.md §6 (tracking)"
)


def _build(config: ConsoleConfig, run: Any) -> ConsoleTracker:
    return ConsoleTracker(config, run.logger)


@hookimpl
def prx_register_trackers(registry: Any) -> None:
    registry.register("console", _build, ConsoleConfig)
