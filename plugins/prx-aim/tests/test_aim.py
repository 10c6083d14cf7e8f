"""Unit tests of the ``aim`` tracker against temporary Aim repos, read back through ``aim.Repo``."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aim
import numpy as np
import pytest
from aim.sdk.lock_manager import LockManager, SFRunLock
from aim.storage.context import Context
from PIL import Image
from prx_aim import INFO, AimConfig, _build
from prx_aim.tracker import PRECISION_TAG, REPO_DIR, RUN_HASH_FILE, AimTracker, _plain

from prx_core.config import bind
from prx_core.recipe import deep_merge, load
from prx_core.testing.fixtures import write_recipe

LOGGER = logging.getLogger("prx.test_aim")


def _hparams(name: str = "unit", warning: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "recipe": {
            "name": name,
            "description": "a unit-test run",
            "optimizer": {"use": "adamw", "lr": 1e-3, "betas": [0.9, 0.95]},
            "model": {"depth": 2, "axes_dim": [8, 8]},
        },
        "plugins": {"aim": "0.1.0", "adamw": "0.1.0"},
        "git_sha": "0123abcd",
        "environment": {"python": "3.11.9", "cuda": None, "gpus": []},
        "precision_warning": warning,
    }


@pytest.fixture(scope="module")
def empty_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty Aim repo. Initialising one runs Aim's database migrations in a
    subprocess (seconds), so tests copy this one instead; creation itself is tested once."""
    path = tmp_path_factory.mktemp("template") / REPO_DIR
    aim.Repo.from_path(str(path), init=True)
    return path


@pytest.fixture
def run_dir(tmp_path: Path, empty_repo: Path) -> Path:
    """A run directory whose default Aim repo (``<run_dir>/aim``) already exists, still empty."""
    shutil.copytree(empty_repo, tmp_path / "run" / REPO_DIR)
    return tmp_path / "run"


def _tracker(run_dir: Path, **config: Any) -> AimTracker:
    return AimTracker(AimConfig(**config), run_dir, LOGGER)


def _runs(repo: Path) -> list[Any]:
    """Runs of a repo as a new reader sees them (a fresh ``aim.Repo``, like another process)."""
    return list(aim.Repo(str(repo)).iter_runs())


def _series(run: Any, name: str, context: dict[str, str]) -> tuple[list[int], list[float]]:
    metric = run.get_metric(name, Context(context))
    assert metric is not None, f"no metric {name} {context}"
    steps, (values, *_) = metric.data.items_list()
    return list(steps), list(values)


# ---------------------------------------------------------------------- config and factory


def test_info_and_config_defaults() -> None:
    assert INFO.name == "aim"
    config = AimConfig()
    assert (config.repo, config.experiment, config.system_metrics_interval) == ("", "", 0.0)


def test_config_rejects_negative_interval_and_unknown_keys() -> None:
    with pytest.raises(ValueError, match="system_metrics_interval"):
        AimConfig(system_metrics_interval=-1)
    with pytest.raises(Exception, match="reopo"):
        bind(AimConfig, {"reopo": "x"})


def test_recipe_binds_tracker_table(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, {"tracker": {"use": "aim", "repo": "/shared/aim", "experiment": "ablations"}})
    recipe = load(path)
    assert recipe.slots["tracker"].use == "aim"
    assert recipe.slots["tracker"].config == AimConfig(repo="/shared/aim", experiment="ablations")
    assert recipe.resolved()["tracker"] == {
        "use": "aim",
        "repo": "/shared/aim",
        "experiment": "ablations",
        "system_metrics_interval": 0.0,
    }
    assert deep_merge({}, recipe.resolved())["tracker"]["use"] == "aim"


def test_factory_touches_nothing_before_start(tmp_path: Path) -> None:
    """Every rank builds the tracker; only rank 0 starts it, so building must not create a repo."""
    run = SimpleNamespace(run_dir=tmp_path / "run", logger=LOGGER)
    tracker = _build(AimConfig(), run)
    assert isinstance(tracker, AimTracker)
    assert tracker.repo_path == tmp_path / "run" / REPO_DIR
    assert not (tmp_path / "run").exists()
    tracker.close()  # closing a tracker that never started is a no-op


def test_use_before_start_raises(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path)
    with pytest.raises(RuntimeError, match="before start"):
        tracker.log_metrics({"loss": 1.0}, 1)


# ---------------------------------------------------------------------- what a run records


def test_records_hparams_metrics_contexts_and_tag(run_dir: Path) -> None:
    tracker = _tracker(run_dir)
    tracker.start(_hparams(warning="bf16 weights: an ablation"), total_steps=10, first_step=0)
    tracker.log_metrics({"loss": 0.5, "lr/all": 1e-3}, 1)
    tracker.log_metrics({"loss": 0.25, "lr/all": 2e-3}, 2)
    tracker.log_metrics({"loss": 0.75}, 2, {"subset": "eval"})
    tracker.log_metrics({"loss": 0.8}, 2, {"subset": "eval", "t_bin": "0.0-0.5"})
    tracker.log_metrics({"loss": 0.7}, 2, {"subset": "eval", "t_bin": "0.5-1.0"})
    tracker.close()

    runs = _runs(run_dir / REPO_DIR)
    assert len(runs) == 1
    run = runs[0]
    assert run.hash == (run_dir / RUN_HASH_FILE).read_text().strip()
    assert run.experiment == "unit"  # experiment defaults to the recipe name
    assert run.name == "run"  # the run directory's name
    assert run.description == "a unit-test run"
    assert run["hparams"] == _hparams(warning="bf16 weights: an ablation")
    assert run["hparams", "recipe", "optimizer", "lr"] == 1e-3
    assert run.props.tags == [PRECISION_TAG]

    assert _series(run, "loss", {"subset": "train"}) == ([1, 2], [0.5, 0.25])
    assert _series(run, "lr/all", {"subset": "train"}) == ([1, 2], [1e-3, 2e-3])
    assert _series(run, "loss", {"subset": "eval"}) == ([2], [0.75])
    assert _series(run, "loss", {"subset": "eval", "t_bin": "0.0-0.5"}) == ([2], [0.8])
    assert _series(run, "loss", {"subset": "eval", "t_bin": "0.5-1.0"}) == ([2], [0.7])
    contexts = {(m.name, tuple(sorted(m.context.to_dict().items()))) for m in run.metrics()}
    assert contexts == {
        ("loss", (("subset", "train"),)),
        ("lr/all", (("subset", "train"),)),
        ("loss", (("subset", "eval"),)),
        ("loss", (("subset", "eval"), ("t_bin", "0.0-0.5"))),
        ("loss", (("subset", "eval"), ("t_bin", "0.5-1.0"))),
    }
    # System parameters stay off: collecting them crashes with setuptools >= 82.
    assert run.get("__system_params") is None


def test_no_tag_without_precision_warning(run_dir: Path) -> None:
    tracker = _tracker(run_dir)
    tracker.start(_hparams(), 10, 0)
    tracker.close()
    assert _runs(run_dir / REPO_DIR)[0].props.tags == []


def test_query_metrics_sees_closed_run(run_dir: Path) -> None:
    """Aim's query language works on the repo right after close (the run is indexed)."""
    tracker = _tracker(run_dir)
    tracker.start(_hparams(), 10, 0)
    tracker.log_metrics({"loss": 3.0}, 5, {"subset": "eval", "t_bin": "0.0-0.2"})
    tracker.log_metrics({"loss": 4.0}, 5, {"subset": "eval", "t_bin": "0.2-0.4"})
    tracker.close()
    query = "metric.name == 'loss' and metric.context.t_bin == '0.0-0.2'"
    found = list(aim.Repo(str(run_dir / REPO_DIR)).query_metrics(query, report_mode=0))
    assert [(m.values.values_list(), m.context.to_dict()) for m in found] == [
        ([3.0], {"subset": "eval", "t_bin": "0.0-0.2"})
    ]


def test_logs_image_with_prompts_caption(run_dir: Path) -> None:
    pixels = np.zeros((6, 10, 3), dtype=np.uint8)
    pixels[1:3, 2:7] = [200, 40, 10]
    pixels[4, 9] = [1, 2, 3]
    path = run_dir / "samples" / "step_00000003.png"
    path.parent.mkdir()
    Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text("0: a red square\n1: a blue circle\n")
    bare = run_dir / "samples" / "grid.png"
    Image.fromarray(pixels[::-1].copy()).save(bare)

    tracker = _tracker(run_dir)
    tracker.start(_hparams(), 10, 0)
    tracker.log_image("samples", str(path), 3)
    tracker.log_image("samples", str(bare), 4)
    tracker.close()

    run = _runs(run_dir / REPO_DIR)[0]
    sequence = run.get_image_sequence("samples", Context({}))
    steps, (images, *_) = sequence.data.items_list()
    assert list(steps) == [3, 4]
    first, second = images
    assert first.caption == "0: a red square\n1: a blue circle"
    assert second.caption == "grid.png"  # no prompt file next to it
    assert first.format == "png"
    np.testing.assert_array_equal(np.asarray(first.to_pil_image().convert("RGB")), pixels)
    np.testing.assert_array_equal(np.asarray(second.to_pil_image().convert("RGB")), pixels[::-1])


# ---------------------------------------------------------------------- repositories


def test_repo_is_created_where_missing(tmp_path: Path) -> None:
    """Default ``<run_dir>/aim`` and a shared path are both created on start (here: a shared one)."""
    shared = tmp_path / "team" / "aim-repo"
    tracker = _tracker(tmp_path / "a", repo=str(shared), experiment="sweep")
    tracker.start(_hparams("a"), 5, 0)
    tracker.close()
    assert aim.Repo.exists(str(shared))
    assert not (tmp_path / "a" / REPO_DIR).exists()
    assert [r.experiment for r in _runs(shared)] == ["sweep"]


def test_shared_repo_holds_several_runs(tmp_path: Path, empty_repo: Path) -> None:
    shared = tmp_path / "shared"
    shutil.copytree(empty_repo, shared)
    for name in ("a", "b"):
        tracker = _tracker(tmp_path / name, repo=str(shared), experiment="sweep")
        tracker.start(_hparams(name), 5, 0)
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.close()
        assert not (tmp_path / name / REPO_DIR).exists()
        assert (tmp_path / name / RUN_HASH_FILE).is_file()
    runs = _runs(shared)
    assert sorted(r["hparams", "name"] for r in runs) == ["a", "b"]
    assert {r.experiment for r in runs} == {"sweep"}
    assert sorted(r.name for r in runs) == ["a", "b"]


def test_shared_repo_path_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _tracker(tmp_path / "run", repo="~/aim").repo_path == tmp_path / "aim"


# ---------------------------------------------------------------------- resume


def test_resume_continues_the_same_run(run_dir: Path) -> None:
    first = _tracker(run_dir)
    first.start(_hparams(), 4, 0)
    first.log_metrics({"loss": 1.0}, 1)
    first.log_metrics({"loss": 0.9}, 2)
    first.close()
    run_hash = (run_dir / RUN_HASH_FILE).read_text().strip()

    second = _tracker(run_dir)
    second.start(_hparams(warning="now it warns"), 4, first_step=1)
    assert second.run.hash == run_hash
    # A crash after the step-1 checkpoint: the resumed run replays step 2, replacing its value.
    second.log_metrics({"loss": 0.85}, 2)
    second.log_metrics({"loss": 0.8}, 3)
    second.log_metrics({"loss": 0.7}, 4)
    second.close()

    runs = _runs(run_dir / REPO_DIR)
    assert [r.hash for r in runs] == [run_hash]
    assert _series(runs[0], "loss", {"subset": "train"}) == ([1, 2, 3, 4], [1.0, 0.85, 0.8, 0.7])
    assert runs[0]["hparams", "precision_warning"] == "now it warns"  # the resumed run's hparams win
    assert runs[0].props.tags == [PRECISION_TAG]


def test_fresh_start_in_old_run_dir_makes_a_new_run(run_dir: Path) -> None:
    """first_step 0 (e.g. --resume auto without a checkpoint): a new Aim run, not a rewrite of the old."""
    hashes = []
    for _ in range(2):
        tracker = _tracker(run_dir)
        tracker.start(_hparams(), 4, 0)
        hashes.append(tracker.run.hash)
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.close()
    assert hashes[0] != hashes[1]
    assert sorted(r.hash for r in _runs(run_dir / REPO_DIR)) == sorted(hashes)
    assert (run_dir / RUN_HASH_FILE).read_text().strip() == hashes[1]


def test_resume_without_hash_file_starts_new_run(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = _tracker(run_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        tracker.start(_hparams(), 4, first_step=2)
    tracker.log_metrics({"loss": 0.5}, 3)
    tracker.close()
    assert "is missing" in caplog.text
    run = _runs(run_dir / REPO_DIR)[0]
    assert run.hash == (run_dir / RUN_HASH_FILE).read_text().strip()
    assert _series(run, "loss", {"subset": "train"}) == ([3], [0.5])


def test_resume_with_run_missing_from_repo_starts_new_run(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (run_dir / RUN_HASH_FILE).write_text("0123456789abcdef01234567\n")
    tracker = _tracker(run_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        tracker.start(_hparams(), 4, first_step=2)
    tracker.close()
    assert "is not in the Aim repo" in caplog.text
    [run] = _runs(run_dir / REPO_DIR)
    assert run.hash != "0123456789abcdef01234567"
    assert (run_dir / RUN_HASH_FILE).read_text().strip() == run.hash


def test_resume_takes_over_a_lock_left_on_another_machine(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = _tracker(run_dir)
    first.start(_hparams(), 4, 0)
    first.log_metrics({"loss": 1.0}, 1)
    run_hash = first.run.hash
    first.close()
    # The lock a process on another machine (so Aim cannot tell whether it is alive) left behind.
    lock = run_dir / REPO_DIR / ".aim" / "locks" / f"{run_hash}.softlock"
    lock.write_text(f"{LockManager.machine_id + 1}-{os.getpid()}-0")
    # Aim waits 10 s for such a lock; the test need not.
    monkeypatch.setattr(
        LockManager,
        "get_run_lock",
        lambda self, h, timeout=10: SFRunLock(self, h, self.locks_path / self.softlock_fname(h), timeout=0.1),
    )
    second = _tracker(run_dir)
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        second.start(_hparams(), 4, first_step=1)
    assert second.run.hash == run_hash
    second.log_metrics({"loss": 0.5}, 2)
    second.close()
    assert "taking the lock over" in caplog.text
    assert _series(_runs(run_dir / REPO_DIR)[0], "loss", {"subset": "train"}) == ([1, 2], [1.0, 0.5])


def test_close_while_index_is_busy_warns_and_aim_up_can_index_later(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aim.sdk.index_manager import RepoIndexManager

    tracker = _tracker(run_dir)
    tracker.start(_hparams(), 4, 0)
    tracker.log_metrics({"loss": 1.0}, 1)
    run_hash = tracker.run.hash
    holder = aim.Repo(str(run_dir / REPO_DIR))
    busy = holder._get_index_tree("meta", 0)  # what a running `aim up` holds while indexing
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        tracker.close()  # must not raise: core would count a failure for a run that was recorded
    assert "could not index" in caplog.text
    del busy, holder
    # What `aim up` does when it scans the repo.
    RepoIndexManager(aim.Repo(str(run_dir / REPO_DIR))).index(run_hash)
    assert _series(_runs(run_dir / REPO_DIR)[0], "loss", {"subset": "train"}) == ([1], [1.0])


def test_start_twice_raises(run_dir: Path) -> None:
    tracker = _tracker(run_dir)
    tracker.start(_hparams(), 4, 0)
    try:
        with pytest.raises(RuntimeError, match="already started"):
            tracker.start(_hparams(), 4, 0)
    finally:
        tracker.close()


# ---------------------------------------------------------------------- values Aim can store


def test_plain_converts_what_aim_cannot_store() -> None:
    class Version(str):  # like torch.__version__ (TorchVersion), a str subclass Aim's encoder rejects
        pass

    class Count(int):
        pass

    converted = _plain({"torch": Version("2.14.1"), "dims": (8, 8), "path": Path("/a/b"), 3: Count(4), "ok": True})
    assert converted == {"torch": "2.14.1", "dims": [8, 8], "path": "/a/b", "3": 4, "ok": True}
    assert type(converted["torch"]) is str and type(converted["3"]) is int and converted["ok"] is True


# ---------------------------------------------------------------------- system metrics and cleanup


def test_system_metrics_when_asked_and_no_threads_left(run_dir: Path) -> None:
    import threading
    import time

    before = set(threading.enumerate())
    tracker = _tracker(run_dir, system_metrics_interval=0.1)
    tracker.start(_hparams(), 4, 0)
    time.sleep(0.5)
    tracker.close()
    assert set(threading.enumerate()) <= before, "the tracker left threads running after close()"
    names = {m.name for m in _runs(run_dir / REPO_DIR)[0].metrics()}
    assert "__system__cpu" in names
