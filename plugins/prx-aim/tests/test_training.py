"""A tiny training run tracked by ``aim``, resumed once, then read back from its Aim repo."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import aim  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from aim.storage.context import Context  # noqa: E402
from PIL import Image  # noqa: E402
from prx_aim.tracker import REPO_DIR, RUN_HASH_FILE  # noqa: E402

from prx_core.recipe import Recipe  # noqa: E402
from prx_core.testing.fixtures import make_trainer, tiny_recipe  # noqa: E402

#: Aim on, evaluation at the end shrunk to seconds (2 t-bins, 4 samples, 2 sampling steps).
PATCH: dict[str, Any] = {
    "tracker": {"use": "aim"},
    "train": {"steps": 2, "checkpoint_every": 2},
    "eval": {"num_samples": 4, "batch": 4, "steps": 2, "t_bins": 2},
}


@dataclass
class Tracked:
    run_dir: Path
    recipe: Recipe  # the resumed run's recipe (train.steps raised to 3)
    hashes: list[str]  # the Aim run hash after the first and after the resumed training
    failures: list[int]  # each trainer's tracker_failures


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    """Train 2 steps, then resume to step 3 in the same run directory (train.steps may change)."""
    root = tmp_path_factory.mktemp("aim_training")
    run_dir = root / "run"
    first = make_trainer(tiny_recipe(root / "a", PATCH), run_dir)
    first.fit()
    hashes = [(run_dir / RUN_HASH_FILE).read_text().strip()]
    recipe = tiny_recipe(root / "b", {**PATCH, "train": {"steps": 3, "checkpoint_every": 2}})
    second = make_trainer(recipe, run_dir, resume="auto")
    assert second.step == 2
    second.fit()
    hashes.append((run_dir / RUN_HASH_FILE).read_text().strip())
    return Tracked(run_dir, recipe, hashes, [first.tracker_failures, second.tracker_failures])


def _only_run(tracked: Tracked) -> Any:
    runs = list(aim.Repo(str(tracked.run_dir / REPO_DIR)).iter_runs())
    assert len(runs) == 1, [r.hash for r in runs]
    return runs[0]


def _jsonl(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_no_tracker_failures_and_one_aim_run_across_resume(tracked: Tracked) -> None:
    assert tracked.failures == [0, 0]
    assert tracked.hashes[0] == tracked.hashes[1]
    assert _only_run(tracked).hash == tracked.hashes[0]


def test_train_metrics_match_metrics_jsonl(tracked: Tracked) -> None:
    run = _only_run(tracked)
    train_lines = [line for line in _jsonl(tracked.run_dir) if "loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3]
    for name in ("loss", "grad_norm", "lr"):
        metric = run.get_metric(name, Context({"subset": "train"}))
        assert metric is not None, name
        steps, (values, *_) = metric.data.items_list()
        assert list(steps) == [1, 2, 3], name
        assert list(values) == [line[name] for line in train_lines], name


def test_eval_metrics_have_subset_and_t_bin_contexts(tracked: Tracked) -> None:
    run = _only_run(tracked)
    eval_lines = [line for line in _jsonl(tracked.run_dir) if "eval/loss" in line]
    assert [line["step"] for line in eval_lines] == [2, 3]
    overall = run.get_metric("loss", Context({"subset": "eval"}))
    steps, (values, *_) = overall.data.items_list()
    assert list(steps) == [2, 3]
    assert list(values) == [line["eval/loss"] for line in eval_lines]
    bins = sorted(m.context["t_bin"] for m in run.metrics() if m.name == "loss" and "t_bin" in m.context.to_dict())
    assert len(bins) == 2  # eval.t_bins = 2
    for t_bin in bins:
        metric = run.get_metric("loss", Context({"subset": "eval", "t_bin": t_bin}))
        steps, (values, *_) = metric.data.items_list()
        assert list(steps) == [2, 3]
        assert list(values) == [line[f"eval/loss/t{t_bin}"] for line in eval_lines]


def test_hparams_hold_recipe_plugins_and_git_sha(tracked: Tracked) -> None:
    run = _only_run(tracked)
    hparams = run["hparams"]
    assert hparams["name"] == "tiny"
    # The resolved recipe, as plain data (JSON's view of it: tuples become lists).
    assert hparams["recipe"] == json.loads(json.dumps(tracked.recipe.resolved()))
    assert hparams["recipe"]["tracker"]["use"] == "aim"
    assert hparams["recipe"]["train"]["steps"] == 3  # the resumed run's recipe
    assert hparams["plugins"] == tracked.recipe.active.versions_table()
    assert hparams["plugins"]["aim"] == "0.1.0"
    assert isinstance(hparams["git_sha"], str)
    assert "torch" in hparams["environment"]
    assert hparams["precision_warning"] == ""
    assert run.experiment == "tiny"
    assert run.props.tags == []


def test_sample_grids_are_images(tracked: Tracked) -> None:
    run = _only_run(tracked)
    sequence = run.get_image_sequence("samples", Context({}))
    assert sequence is not None
    steps, (images, *_) = sequence.data.items_list()
    assert list(steps) == [2, 3]
    for step, image in zip(steps, images, strict=True):
        path = tracked.run_dir / "samples" / f"step_{step:08d}.png"
        with Image.open(path) as on_disk:
            expected = np.asarray(on_disk.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(image.to_pil_image().convert("RGB")), expected)
        assert image.caption == path.with_suffix(".txt").read_text().strip()


def test_broken_repo_is_counted_and_training_finishes(tmp_path: Path) -> None:
    """An unusable repo path makes every tracker call fail; core counts them and trains on."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the Aim repo should go")
    patch = {
        "tracker": {"use": "aim", "repo": str(blocker)},
        "train": {"steps": 1, "checkpoint_every": 1},
        "eval": {"at_end": False},
    }
    trainer = make_trainer(tiny_recipe(tmp_path / "recipe", patch), tmp_path / "run")
    result = trainer.fit()
    assert result.step == 1 and not result.stopped_early
    # start and the step-1 metrics at least (also the final grid); close has nothing to close.
    assert trainer.tracker_failures >= 2
    assert len(_jsonl(tmp_path / "run")) == 1  # metrics.jsonl keeps the full record regardless
