"""`prx-run` as a subprocess on tiny recipes: a full run, exact resume in a new process, checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prx_core.testing.fixtures import write_recipe

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def prx_run(
    *args: str, cwd: Path, check: bool = True, nproc: int = 1, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``prx-run ARGS`` as a subprocess; with ``nproc`` > 1, under ``torchrun --nproc_per_node nproc``
    (gloo on the CPU, one thread per rank so the ranks do not oversubscribe the cores)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    launcher = [sys.executable, "-m"]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
        launcher += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    result = subprocess.run(
        [*launcher, "prx_core.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"prx-run {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def training_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl lines of training steps (evaluation lines carry eval/... keys instead)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def losses(run_dir: Path) -> dict[int, float]:
    return {line["step"]: line["loss"] for line in training_lines(run_dir)}


def test_full_run_leaves_a_complete_run_directory(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"steps": 3, "sample_every": 2, "checkpoint_every": 2}})
    result = prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path)
    run = tmp_path / "run"
    assert "finished step 3" in result.stdout
    resolved = (run / "recipe.toml").read_text()
    assert 'use = "minilm"' in resolved and "steps = 3" in resolved
    info = json.loads((run / "run.json").read_text())
    assert info["plugins"]["minilm"] == "0.1.0" and "flow_matching" in info["plugins"]
    assert info["environment"]["torch"] == torch.__version__
    assert sorted(losses(run)) == [1, 2, 3]
    assert (run / "samples" / "step_00000002.png").exists() and (run / "samples" / "step_00000003.png").exists()
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == [
        "step_00000002",
        "step_00000003",
    ]
    assert (run / "train.log").read_text().count("saved checkpoint") == 2
    from diffusers import PRXTransformer2DModel

    exported = PRXTransformer2DModel.from_pretrained(run / "final" / "transformer")
    assert exported.config.hidden_size == 32
    # The resolved recipe is itself a runnable recipe.
    check = prx_run("check", str(run / "recipe.toml"), cwd=tmp_path)
    assert "1 ok, 0 failed" in check.stdout


def test_resume_in_a_new_process_is_bitwise_identical(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"steps": 4, "checkpoint_every": 2}})
    prx_run(str(recipe), "--run-dir", "straight", cwd=tmp_path)
    prx_run(str(recipe), "--run-dir", "resumed", "--set", "train.steps=2", cwd=tmp_path)
    prx_run(str(recipe), "--run-dir", "resumed", "--resume", "auto", cwd=tmp_path)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step_00000004" / "trainable.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step_00000004" / "trainable.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    optim_a = load_file(tmp_path / "straight" / "checkpoints" / "step_00000004" / "optimizer.safetensors")
    optim_b = load_file(tmp_path / "resumed" / "checkpoints" / "step_00000004" / "optimizer.safetensors")
    assert all(torch.equal(optim_a[k], optim_b[k]) for k in optim_a)


def test_existing_run_is_not_overwritten_and_drift_is_refused(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"steps": 2, "checkpoint_every": 1}})
    prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path)
    again = prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "--resume auto" in again.stderr
    drift = prx_run(
        str(recipe),
        "--run-dir",
        "run",
        "--resume",
        "auto",
        "--set",
        "optimizer.lr=0.5",
        "--set",
        "train.steps=3",
        cwd=tmp_path,
        check=False,
    )
    assert drift.returncode == 1 and "optimizer.lr" in drift.stderr and "--allow-drift" in drift.stderr
    accepted = prx_run(
        str(recipe),
        "--run-dir",
        "run",
        "--resume",
        "auto",
        "--set",
        "optimizer.lr=0.5",
        "--set",
        "train.steps=3",
        "--allow-drift",
        cwd=tmp_path,
    )
    assert "finished step 3" in accepted.stdout


def test_bad_recipe_is_rejected_before_anything_runs(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"stepz": 3}})
    result = prx_run(str(recipe), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "'train.stepz'" in result.stderr and "did you mean 'steps'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_check_command_validates_every_shipped_recipe() -> None:
    result = prx_run("check", "recipes", cwd=ROOT)
    assert " 0 failed" in result.stdout


def test_check_command_reports_failures(tmp_path: Path) -> None:
    good = write_recipe(tmp_path, name="good.toml")
    bad = write_recipe(tmp_path, {"model": {"in_channels": 16}}, name="bad.toml")
    result = prx_run("check", str(good), str(bad), cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "ok   " in result.stdout and "1 ok, 1 failed" in result.stdout
    assert "FAIL" in result.stderr and "in_channels" in result.stderr


def test_sigterm_saves_at_a_step_boundary_and_resume_continues(tmp_path: Path) -> None:
    import signal
    import time

    recipe = write_recipe(tmp_path, {"train": {"steps": 100_000, "checkpoint_every": 100_000}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prx_core.cli", str(recipe), "--run-dir", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped early at step" in stdout
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("_")[1])
    assert stopped_at >= 3
    result = prx_run(
        str(recipe), "--run-dir", "run", "--resume", "auto", "--set", f"train.steps={stopped_at + 2}", cwd=tmp_path
    )
    assert f"finished step {stopped_at + 2}" in result.stdout
    assert sorted(losses(tmp_path / "run")) == list(range(1, stopped_at + 3))


def test_check_and_plugins_do_not_import_torch() -> None:
    code = (
        "import sys; from prx_core.cli import main; rc = main(['check', 'recipes']); "
        "print('TORCH', 'torch' in sys.modules); sys.exit(rc)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout


def test_shipped_quickstart_recipe_runs_a_few_steps(tmp_path: Path) -> None:
    result = prx_run(
        str(ROOT / "recipes" / "quickstart.toml"),
        "--run-dir",
        "qs",
        "--set",
        "train.steps=3",
        "--set",
        "sampling.steps=2",
        "--set",
        "sampling.num_prompts=4",
        "--set",
        "eval.num_samples=4",
        "--set",
        "eval.steps=2",
        cwd=tmp_path,
    )
    assert "finished step 3" in result.stdout
    assert (tmp_path / "qs" / "samples" / "step_00000003.png").exists()


def test_throughput_is_logged_with_counted_flops(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, {"train": {"steps": 2, "peak_tflops": 0.5}, "eval": {"at_end": False}})
    prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path)
    last = training_lines(tmp_path / "run")[-1]
    for key in ("images_per_s", "batches_per_s", "tflops_per_s_per_device", "mfu", "peak_mem_gb"):
        assert last[key] > 0, key
    assert last["mfu"] == pytest.approx(last["tflops_per_s_per_device"] / 0.5)
    assert 0 < last["data_wait_fraction"] < 1


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"latent_space": {"use": "flux_vae", "path": "/nonexistent/vae", "channels": 3, "spatial_compression": 2}},
            "prx-run: cannot build latent_space 'flux_vae'",
        ),
        (
            {"eval": {"at_end": True}, "metrics": {"fid": {"inception_weights": "/nonexistent/inception.pth"}}},
            "prx-run: cannot build the evaluation metrics",
        ),
    ],
    ids=["missing-autoencoder", "missing-metric-weights"],
)
def test_missing_weights_fail_at_start_in_one_line(tmp_path: Path, patch: dict, message: str) -> None:
    recipe = write_recipe(tmp_path, patch)
    result = prx_run(str(recipe), "--run-dir", "run", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # before the first step
