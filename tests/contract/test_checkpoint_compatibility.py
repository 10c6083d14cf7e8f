"""Checkpoints written by an older prx keep resuming, bit for bit.

Each ``tests/fixtures/checkpoint_v*`` folder is a run directory written once by
``tests/fixtures/make_checkpoint_fixture.py`` with the prx of its day, plus the losses of the
steps that followed its checkpoint. Today's code must resume it without ``--allow-drift`` and
reproduce those losses and the final weights exactly on a CPU of an instruction set that
recorded a golden set (float kernels differ between AVX2 and AVX512), and to 1e-6 elsewhere.
A change to the checkpoint payload that breaks this must bump ``PAYLOAD_VERSION`` and add a
converter, never edit a fixture.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from prx_core.errors import TrainingError
from prx_core.recipe import load
from prx_core.testing.fixtures import make_trainer, parameters_vector, run_steps
from prx_core.trainer import PAYLOAD_UPGRADES, PAYLOAD_VERSION, upgrade_payload

FIXTURES = sorted((Path(__file__).parents[1] / "fixtures").glob("checkpoint_v*"))
GENERATOR = Path(__file__).parents[1] / "fixtures" / "make_checkpoint_fixture.py"


@pytest.fixture
def one_thread() -> Iterator[None]:
    # The fixtures were written on one thread; matmul reductions may split differently on more.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weights_digest(vector: torch.Tensor) -> str:
    spec = importlib.util.spec_from_file_location("make_checkpoint_fixture", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.weights_digest(vector))


def test_a_fixture_exists_for_the_current_payload_version() -> None:
    versions = [int(json.loads((f / "golden.json").read_text())["payload_version"]) for f in FIXTURES]
    assert PAYLOAD_VERSION in versions, "bumped PAYLOAD_VERSION: write a fixture for it with the generator"


def _golden_sets(golden: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    """Every golden set a fixture records, keyed by the CPU capability that measured it
    (``None``: the writer's, from before capabilities were recorded)."""
    sets: dict[str | None, dict[str, Any]] = {golden.get("cpu_capability"): golden}
    sets.update(golden.get("by_cpu_capability", {}))
    return sets


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f.name for f in FIXTURES])
def test_old_checkpoint_resumes_bitwise(fixture: Path, tmp_path: Path, one_thread: None) -> None:
    golden = json.loads((fixture / "golden.json").read_text())
    run_dir = tmp_path / "run"
    shutil.copytree(fixture, run_dir)
    trainer = make_trainer(load(run_dir / "recipe.toml"), run_dir, resume="auto")
    assert trainer.step == golden["saved_at"]
    losses = run_steps(trainer, len(golden["losses"]))
    sets = _golden_sets(golden)
    here = torch.backends.cpu.get_cpu_capability()
    if here in sets:
        # Same instruction set as a recorded golden: the same kernels, so bit for bit.
        assert [repr(x) for x in losses] == sets[here]["losses"]
        assert _weights_digest(parameters_vector(trainer)) == sets[here]["weights_sha256"]
    else:
        # Another instruction set sums in another order (a few ulp); a format break is far larger.
        assert any(
            losses == pytest.approx([float(x) for x in recorded["losses"]], rel=1e-6) for recorded in sets.values()
        ), f"losses {losses} match no golden set of {fixture.name} (CPU capability {here})"


def test_every_recorded_golden_set_agrees_to_a_few_ulp() -> None:
    """The per-CPU golden sets are the same run; they may differ only by summation order."""
    for fixture in FIXTURES:
        sets = list(_golden_sets(json.loads((fixture / "golden.json").read_text())).values())
        first = [float(x) for x in sets[0]["losses"]]
        for other in sets[1:]:
            assert [float(x) for x in other["losses"]] == pytest.approx(first, rel=1e-6)


def test_a_renamed_checkpoint_part_is_refused_by_name(tmp_path: Path) -> None:
    parts = {"trainable": {}, "optimizer": {}, "scheduler": {}, "train_state": {}, "plugins": {}}
    with pytest.raises(TrainingError, match=r"lacks part\(s\) trainer of payload version"):
        upgrade_payload(parts, {"payload_version": PAYLOAD_VERSION}, tmp_path)


def test_a_newer_payload_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="written by a newer prx"):
        upgrade_payload({}, {"payload_version": PAYLOAD_VERSION + 1}, tmp_path)


def test_converters_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A future version 2 that renamed ``trainer`` → ``train_state`` reads version-1 checkpoints
    through its converter (here the reverse: version 2 of this test is the payload of today)."""
    import prx_core.trainer as trainer_module

    def v1_to_v2(parts: dict, meta: dict) -> tuple[dict, dict]:
        parts = dict(parts)
        parts["trainer"] = parts.pop("old_trainer")
        return parts, meta

    monkeypatch.setattr(trainer_module, "PAYLOAD_VERSION", 2)
    monkeypatch.setitem(PAYLOAD_UPGRADES, 1, v1_to_v2)
    old = {"trainable": {}, "optimizer": {}, "scheduler": {}, "old_trainer": {"step": 3}, "plugins": {}}
    parts, meta = trainer_module.upgrade_payload(old, {"payload_version": 1}, tmp_path)
    assert parts["trainer"] == {"step": 3} and meta["payload_version"] == 2
    monkeypatch.delitem(PAYLOAD_UPGRADES, 1)
    with pytest.raises(TrainingError, match="no converter from payload version 1 to 2"):
        trainer_module.upgrade_payload(old, {"payload_version": 1}, tmp_path)


def test_keys_added_since_are_not_drift(tmp_path: Path) -> None:
    """A checkpoint saved before ``train.nonfinite`` existed resumes without --allow-drift: the
    saved recipe is resolved by today's code, so the new key takes its default on both sides."""
    from prx_core.trainer import recipe_drift

    current = load(FIXTURES[0] / "recipe.toml").resolved()
    older = json.loads(json.dumps(current))
    del older["train"]["nonfinite"]
    assert recipe_drift(older, current) == []
    older["train"]["grad_clip"] = 1.0
    assert recipe_drift(older, current) == ["train.grad_clip"]
