"""Grouping: exactly the 2-D block weights go to Muon, everything else (extras too) to AdamW."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from prx_muon import MuonConfig, build_optimizer  # noqa: E402
from prx_muon.grouping import is_muon_parameter, split_parameters  # noqa: E402

from prx_core.denoiser import TrainableModules, build_model  # noqa: E402
from prx_core.testing.fixtures import tiny_recipe  # noqa: E402

#: Every 2-D weight of a PRX block, written out by hand from diffusers' PRXBlock.
BLOCK_MATRICES = (
    "attention.img_qkv_proj.weight",
    "attention.txt_kv_proj.weight",
    "attention.to_out.0.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "modulation.lin.weight",
)


@pytest.fixture(scope="module")
def trainable(tmp_path_factory: pytest.TempPathFactory) -> TrainableModules:
    recipe = tiny_recipe(Path(tmp_path_factory.mktemp("recipe")))
    model = build_model(recipe.model, 384, torch.float32)
    # An extra module as a plugin would add it (e.g. a REPA projector): AdamW, although 2-D.
    extra = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    return TrainableModules(model, {"projector": extra})


def _names(pairs: list[tuple[str, torch.Tensor]]) -> set[str]:
    return {n for n, _ in pairs}


def test_default_patterns_on_the_tiny_prx(trainable: TrainableModules) -> None:
    depth = len(trainable.model.blocks)
    assert depth == 2
    muon, adamw = split_parameters(trainable.named_parameters(), ("model.blocks.*",))
    expected_muon = {f"model.blocks.{i}.{suffix}" for i in range(depth) for suffix in BLOCK_MATRICES}
    assert _names(muon) == expected_muon
    everything = {n for n, _ in trainable.named_parameters()}
    assert _names(adamw) == everything - expected_muon
    # Spot checks of what stays on AdamW.
    for name in (
        "model.img_in.weight",
        "model.txt_in.weight",
        "model.time_in.out_layer.weight",
        "model.final_layer.linear.weight",
        "model.final_layer.adaLN_modulation.1.weight",
        "model.blocks.0.attention.norm_q.weight",
        "model.blocks.1.modulation.lin.bias",
        "extras.projector.0.weight",
        "extras.projector.2.bias",
    ):
        assert name in _names(adamw), name


def test_exclude_patterns_and_extra_patterns(trainable: TrainableModules) -> None:
    muon, _ = split_parameters(trainable.named_parameters(), ("model.blocks.*",), ("*.modulation.*",))
    assert not any("modulation" in n for n in _names(muon))
    assert len(muon) == 2 * (len(BLOCK_MATRICES) - 1)
    muon, _ = split_parameters(trainable.named_parameters(), ("model.blocks.*", "extras.projector.*"))
    assert {"extras.projector.0.weight", "extras.projector.2.weight"} <= _names(muon)
    assert "extras.projector.0.bias" not in _names(muon)


def test_rule_itself() -> None:
    assert is_muon_parameter("model.blocks.3.gate_proj.weight", 2, ("model.blocks.*",), ())
    assert not is_muon_parameter("model.blocks.3.attention.norm_q.weight", 1, ("model.blocks.*",), ())
    assert not is_muon_parameter("model.img_in.weight", 2, ("model.blocks.*",), ())
    assert not is_muon_parameter("model.blocks.3.gate_proj.weight", 2, ("model.blocks.*",), ("*gate*",))
    # Case-sensitive and anchored: a prefix elsewhere in the name does not match.
    assert not is_muon_parameter("extras.model.blocks.0.weight", 2, ("model.blocks.*",), ())


def test_optimizer_groups_are_named_and_skip_frozen(trainable: TrainableModules) -> None:
    trainable.model.img_in.bias.requires_grad_(False)
    try:
        optimizer = build_optimizer(trainable.named_parameters(), MuonConfig(lr=3e-4, adamw_lr=1e-4))
    finally:
        trainable.model.img_in.bias.requires_grad_(True)
    muon, adamw = optimizer.param_groups
    assert (muon["name"], adamw["name"]) == ("muon", "adamw")
    assert (muon["lr"], adamw["lr"]) == (3e-4, 1e-4)
    assert len(muon["params"]) == 2 * len(BLOCK_MATRICES)
    frozen = trainable.model.img_in.bias
    assert all(p is not frozen for p in adamw["params"])
    total = sum(1 for p in trainable.parameters() if p.requires_grad) - 1
    assert len(muon["params"]) + len(adamw["params"]) == total
