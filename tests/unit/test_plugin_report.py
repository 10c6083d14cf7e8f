"""``prx-run plugins -v`` / ``--json`` on the plugins installed in this environment."""

from __future__ import annotations

import json

import pytest

from prx_core.cli import main


def listing(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, dict]:
    assert main(["plugins", "--json", *args]) == 0
    return {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}


def test_json_lists_entries_hooks_requires_and_settings(capsys: pytest.CaptureFixture[str]) -> None:
    plugins = listing(capsys)
    precision = plugins["precision"]
    assert precision["kind"] == "core" and precision["distribution"] == "prx-core"
    assert precision["entries"] == ["precision:bf16_mixed", "precision:bf16_weights", "precision:fp32"]
    ema = plugins["ema"]
    assert ema["kind"] == "installed" and ema["distribution"] == "prx-ema" and ema["entries"] == []
    assert {"prx_before_training", "prx_after_optimizer_step", "prx_checkpoint_state", "prx_sampling_model"} <= set(
        ema["hooks"]
    )
    assert ema["config"]["decay"] == 0.999  # the Config's default
    lpips = plugins["lpips"]
    assert lpips["requires"] == ["objective:x_prediction", "latent_space:pixel"]
    assert plugins["tread"]["entries"] == ["router:tread"] and "prx_guidance" in plugins["tread"]["hooks"]


def test_hook_filter_and_registry_hooks(capsys: pytest.CaptureFixture[str]) -> None:
    guidance = listing(capsys, "--hook", "prx_guidance")
    assert set(guidance) == {"tread"}
    optimizers = listing(capsys, "--hook", "prx_register_optimizers")
    assert {"adamw", "muon"} <= set(optimizers) and "ema" not in optimizers


def test_verbose_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "-v"]) == 0
    out = capsys.readouterr().out
    block = out.split("\nlpips  prx-lpips ", 1)[1].split("\n", 1)[1].split("\n\n")[0]
    lines = [line.strip() for line in block.splitlines()]
    assert "requires:  objective:x_prediction, latent_space:pixel" in lines
    assert any(line.startswith("hooks:") and "prx_loss_terms" in line for line in lines)


def test_unknown_hook_is_refused_with_a_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--hook", "prx_los_terms"]) == 2
    assert "did you mean 'prx_loss_terms'?" in capsys.readouterr().err
