"""Reliability: a strict config corpus, non-finite policies, crash-safe saves, no pickle ever runs."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prx_core.checkpoint import CheckpointManager
from prx_core.cli import cmd_check
from prx_core.config import RecipeError
from prx_core.errors import TrainingError
from prx_core.recipe import load
from prx_core.testing.fixtures import make_trainer, parameters_vector, run_steps, tiny_recipe
from prx_core.trainer import SpikeDetector

BAD = sorted((Path(__file__).parents[1] / "fixtures" / "bad_recipes").glob("*.toml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_strict_config_corpus(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(RecipeError) as err:
        load(path)
    assert expected in str(err.value)
    assert str(path.resolve()) in str(err.value) or "--set" in str(err.value) or "recipe file" in str(err.value)
    # `prx-run check` refuses it too, with the same one-line message: check and a run's start agree.
    assert cmd_check([str(path)]) == 1
    printed = capsys.readouterr()
    assert printed.err.startswith(f"FAIL {path}\n") and expected in printed.err
    assert "\n" not in str(err.value) and "0 ok, 1 failed" in printed.out


def _poison_step(trainer, at_step: int) -> None:
    objective = trainer.run.objective
    real_loss = objective.loss

    def loss(step_ctx, prediction):
        value = real_loss(step_ctx, prediction)
        return value * float("nan") if step_ctx.step == at_step else value

    objective.loss = loss


def test_nonfinite_halt_stops_before_the_optimizer_step(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path), tmp_path / "run")
    run_steps(trainer, 1)
    before = parameters_vector(trainer).clone()
    state_before = {k: v.clone() for k, v in next(iter(trainer.optimizer.state.values())).items()}
    _poison_step(trainer, at_step=1)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 2; stopped before the optimizer step"):
        run_steps(trainer, 1)
    assert torch.equal(parameters_vector(trainer), before)
    state_after = next(iter(trainer.optimizer.state.values()))
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())


def test_nonfinite_skip_leaves_weights_state_and_step_hooks_untouched(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_recipe(tmp_path, {"train": {"nonfinite": "skip"}}), tmp_path / "run")
    run_steps(trainer, 1)
    before = parameters_vector(trainer).clone()
    state_before = {k: v.clone() for k, v in next(iter(trainer.optimizer.state.values())).items()}
    calls: list[int] = []
    real_hook = trainer.pm.hook.prx_after_optimizer_step

    trainer.pm.hook.prx_after_optimizer_step = lambda **kw: (calls.append(kw["step"]), real_hook(**kw))[1]
    _poison_step(trainer, at_step=1)
    run_steps(trainer, 1)
    assert trainer.nonfinite_skipped == 1
    assert torch.equal(parameters_vector(trainer), before)
    state_after = next(iter(trainer.optimizer.state.values()))
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert calls == []  # EMA and other after-step plugins did not run
    run_steps(trainer, 1)  # training goes on
    assert calls == [3] and not torch.equal(parameters_vector(trainer), before)


def test_spike_detector() -> None:
    detector = SpikeDetector(factor=3.0, warmup=3)
    assert [detector.update(x) for x in (1.0, 1.0, 1.0)] == [False, False, False]
    assert detector.update(5.0) is True and detector.count == 1
    assert detector.mean == pytest.approx(1.0)  # a spike does not move the running mean
    assert detector.update(1.1) is False
    restored = SpikeDetector()
    restored.load_state_dict(detector.state_dict())
    assert restored.state_dict() == detector.state_dict()


WRITER = r"""
import sys, torch
from pathlib import Path
from prx_core.checkpoint import CheckpointManager
manager = CheckpointManager(Path(sys.argv[1]), keep_last=2)
big = {f"w{i}": torch.full((2_000_000,), float(i)) for i in range(6)}   # ~48 MB over several files
print("ready", flush=True)
manager.save(2, {"trainable": big, "optimizer": big, "trainer": {"step": 2}})
"""


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path: Path, fraction: float) -> None:
    root = tmp_path / "checkpoints"
    CheckpointManager(root).save(1, {"trainable": {"w": torch.ones(3)}, "trainer": {"step": 1}})
    expected = 2 * 6 * 2_000_000 * 4
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        written = sum(f.stat().st_size for d in root.glob(".tmp-*") for f in d.glob("*") if f.is_file())
        if written >= fraction * expected:
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manager = CheckpointManager(root)
    latest = manager.latest_valid()
    assert latest is not None
    if latest.step == 2:  # the writer won the race and committed: then it must be complete
        assert manager.verify(latest) is None
    else:
        assert latest.step == 1
        parts, _ = manager.load(latest)
        assert torch.equal(parts["trainable"]["w"], torch.ones(3))
    # Retention under crash: the next save cleans the debris and keeps at most keep_last.
    manager.save(3, {"trainable": {"w": torch.zeros(3)}, "trainer": {"step": 3}})
    assert not list(root.glob(".tmp-*"))
    assert [c.step for c in manager.committed()][-1] == 3 and len(manager.committed()) <= 2


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_malicious_pickle_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(tiny_recipe(tmp_path), tmp_path / "run")
    run_steps(trainer, 1)
    info = trainer.save()
    assert info is not None
    # Swap a checkpoint file for a pickle bomb: the manifest catches it, nothing unpickles it.
    (info.path / "trainer.json").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(Exception, match="sha256|size|mismatch|corrupt"):
        CheckpointManager(info.path.parent).load(info)
    # And torch.load as prx uses it (weights_only=True) refuses to run the payload.
    bomb = tmp_path / "weights.pth"
    bomb.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bomb, weights_only=True)
    assert not (tmp_path / "PWNED").exists()
