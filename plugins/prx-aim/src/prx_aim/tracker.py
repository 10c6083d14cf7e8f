"""The Aim tracker. Core calls it on rank 0 only, and counts and logs any exception it raises
without stopping training, so errors here propagate: a broken tracker must be visible, not silent.

Aim is imported in :meth:`AimTracker.start`, so the factory stays cheap on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prx_aim import AimConfig
from prx_core.rundir import write_atomic

#: Where the Aim repository lives inside the run directory when ``repo`` is empty.
REPO_DIR = "aim"
#: The Aim run hash of this run directory, so that a resumed run continues the same Aim run.
RUN_HASH_FILE = "aim_run.txt"
#: Tag added to runs whose precision policy warns (e.g. the ``bf16_weights`` ablation).
PRECISION_TAG = "precision-warning"
#: Context of metrics logged without one: core's training metrics.
TRAIN_CONTEXT = {"subset": "train"}
#: Longest image caption kept (the prompt list of a grid); Aim stores captions with each image.
MAX_CAPTION_CHARS = 2000


class AimTracker:
    """One Aim run per run directory: created at the first start, reopened on every resume."""

    def __init__(self, config: AimConfig, run_dir: Path, logger: logging.Logger) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.run: Any = None  # aim.Run once started

    @property
    def repo_path(self) -> Path:
        if self.config.repo:
            return Path(self.config.repo).expanduser()
        return self.run_dir / REPO_DIR

    # ------------------------------------------------------------------ the Tracker protocol

    def start(self, hparams: dict[str, Any], total_steps: int, first_step: int) -> None:
        import aim

        if self.run is not None:
            raise RuntimeError(f"aim tracker already started (Aim run {self.run.hash}); close() it first")
        repo_path = self.repo_path
        if not aim.Repo.exists(str(repo_path)):
            repo_path.mkdir(parents=True, exist_ok=True)
            aim.Repo.from_path(str(repo_path), init=True)
        name = str(hparams.get("name", ""))
        experiment = self.config.experiment or name or None
        run_hash = self._run_to_continue(aim.Repo.from_path(str(repo_path)), first_step)
        self.run = self._open(run_hash, str(repo_path), experiment)
        if run_hash is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # core made it already; a shared repo may be elsewhere
            write_atomic(self.run_dir / RUN_HASH_FILE, f"{self.run.hash}\n")
        self.run.name = self.run_dir.name
        recipe = hparams.get("recipe")
        description = recipe.get("description") if isinstance(recipe, dict) else None
        if description:
            self.run.description = str(description)
        # Everything core hands over, under one key: the resolved recipe, plugin versions, git
        # SHA, environment and precision warning; Aim's UI lists them as hparams.recipe.*, etc.
        self.run["hparams"] = _plain(hparams)
        if hparams.get("precision_warning") and PRECISION_TAG not in self.run.props.tags:
            self.run.add_tag(PRECISION_TAG)
        self.logger.info(
            "aim: %s run %s in %s (experiment '%s'); view with: aim up --repo %s --host 127.0.0.1",
            "continuing" if run_hash else "started",
            self.run.hash,
            repo_path,
            experiment or "default",
            repo_path,
        )

    def log_metrics(self, metrics: dict[str, float], step: int, context: dict[str, str] | None = None) -> None:
        run = self._require_run()
        where = dict(context) if context else dict(TRAIN_CONTEXT)
        for name, value in metrics.items():
            run.track(float(value), name=name, step=step, context=where)

    def log_image(self, name: str, path: str, step: int) -> None:
        import aim
        from PIL import Image

        run = self._require_run()
        with Image.open(path) as opened:
            opened.load()  # decode now: the file is closed when the block ends
            picture = opened.copy()
        run.track(aim.Image(picture, caption=_caption(Path(path)), format="png"), name=name, step=step, context={})

    def close(self) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        run_hash, repo = run.hash, run.repo
        run.close()
        _index(repo, run_hash, self.logger)

    # ------------------------------------------------------------------ helpers

    def _require_run(self) -> Any:
        if self.run is None:
            raise RuntimeError("aim tracker used before start() (or after close())")
        return self.run

    def _run_to_continue(self, repo: Any, first_step: int) -> str | None:
        """The Aim run to reopen: this run directory's, when resuming and the repo still has it."""
        if first_step <= 0:
            return None
        hash_file = self.run_dir / RUN_HASH_FILE
        if not hash_file.is_file():
            self.logger.warning(
                "aim: resuming at step %d but %s is missing (the run was tracked elsewhere before); "
                "starting a new Aim run",
                first_step,
                hash_file,
            )
            return None
        run_hash = hash_file.read_text(encoding="utf-8").strip()
        if not repo.run_exists(run_hash):
            self.logger.warning(
                "aim: run %s (from %s) is not in the Aim repo %s (repo moved or deleted?); starting a new Aim run",
                run_hash,
                hash_file,
                repo.path,
            )
            return None
        return run_hash

    def _open(self, run_hash: str | None, repo: str, experiment: str | None) -> Any:
        import aim
        from aim.sdk.errors import RunLockingError
        from filelock import Timeout

        options: dict[str, Any] = {
            "repo": repo,
            "experiment": experiment,
            # Aim's system-parameter logging lists installed packages through pkg_resources, which
            # setuptools >= 82 no longer ships: it would crash. Versions that matter are in hparams.
            "log_system_params": False,
            "system_tracking_interval": self.config.system_metrics_interval or None,
            # Capturing would replace sys.stdout/stderr process-wide; train.log already has the log.
            "capture_terminal_logs": False,
        }
        if run_hash is None:
            return aim.Run(**options)
        try:
            return aim.Run(run_hash=run_hash, **options)
        except (RunLockingError, Timeout):
            # The previous process of this run directory died without closing its Aim run, on
            # another machine (Aim clears stale locks of dead processes on the same machine
            # itself). Only one trainer resumes a run directory, so the lock is stale: take it.
            self.logger.warning(
                "aim: run %s is still locked by a process that did not close it; taking the lock over", run_hash
            )
            return aim.Run(run_hash=run_hash, force_resume=True, **options)


def _index(repo: Any, run_hash: str, logger: logging.Logger) -> None:
    """Write the closed run into the repo's index, so ``aim.Repo(path)`` queries see it at once.

    Aim 3.29 readers (``iter_runs``, ``query_metrics``) look at the index only, which ``aim up``
    otherwise fills in the background when it starts; without this, a script reading the repo
    after training would find no runs.
    """
    import aimrocks
    from aim.sdk.index_manager import RepoIndexManager

    # A fresh manager rather than Aim's pooled one, which would keep the repo open for good.
    manager = RepoIndexManager(repo)
    try:
        manager.index(run_hash)
    except aimrocks.errors.RocksIOError as error:
        # The index is locked by another process: a running ``aim up``, which indexes the run itself.
        logger.warning(
            "aim: could not index run %s now (%s); `aim up` indexes it when it scans the repo", run_hash, error
        )
    finally:
        # Its constructor already opened an inotify watch (and thread) on the repo: release them.
        manager.stop()


def _caption(path: Path) -> str:
    """The grid's prompts (core writes them next to the PNG), or the file name."""
    prompts = path.with_suffix(".txt")
    if prompts.is_file():
        text = prompts.read_text(encoding="utf-8").strip()
        return text if len(text) <= MAX_CAPTION_CHARS else text[: MAX_CAPTION_CHARS - 1] + "…"
    return path.name


def _plain(value: Any) -> Any:
    """Aim stores dicts, lists, str, int, float, bool and None; anything else becomes its string."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    # Exact types: Aim's encoder rejects subclasses such as torch's TorchVersion (a str).
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return str(value)
