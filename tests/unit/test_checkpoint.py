"""Tests for prx_core.checkpoint: pickle-free state round trips and crash-safe checkpoint directories."""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from prx_core import checkpoint as ckpt
from prx_core.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    flatten_state,
    load_part,
    resolve_checkpoint,
    save_part,
    unflatten_state,
)

# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality that is exact for tensors (dtype, shape, bits) and types (bool vs int, tuple vs list)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        # Compare raw bytes so that nan payloads and -0.0 count too.
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{path}: key type of {k!r}"
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def round_trip(state: Any) -> Any:
    skeleton, tensors = flatten_state(state)
    # Skeleton must be strict JSON: serialise and parse it for real before unflattening.
    text = json.dumps(skeleton, allow_nan=False)
    return unflatten_state(json.loads(text), tensors)


def make_model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    return model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen)
    y = torch.randn(16, 2, generator=gen)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def sample_parts(scale: float = 1.0) -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4) * scale, "b": torch.ones(4)},
        "trainer": {"step": 3, "loss_ema": float("nan"), "names": ("a", "b")},
    }


# ----------------------------------------------------------------------------------------------------------
# flatten / unflatten
# ----------------------------------------------------------------------------------------------------------


def test_adamw_state_round_trip_and_bitwise_resume(tmp_path: Path) -> None:
    model, opt = make_model_and_opt()
    for s in range(2):
        train_step(model, opt, s)
    state = opt.state_dict()
    restored = round_trip(state)
    assert_same(state, restored)
    assert all(isinstance(k, int) for k in restored["state"])
    assert restored["param_groups"][0]["betas"] == (0.9, 0.95)

    # A fresh model/optimizer loaded from disk must continue bitwise identically.  (Going through disk
    # matters: in-memory round trips alias the live moment buffers, which load_state_dict would then share.)
    save_part(tmp_path, "train", {"model": model.state_dict(), "opt": state})
    loaded = load_part(tmp_path, "train")
    model2, opt2 = make_model_and_opt(seed=123)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    for s in range(2, 5):
        train_step(model, opt, s)
        train_step(model2, opt2, s)
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)


def test_rng_states_round_trip() -> None:
    torch_state = torch.get_rng_state()
    assert_same(torch_state, round_trip(torch_state))

    py_state = random.getstate()
    restored = round_trip(py_state)
    assert_same(py_state, restored)
    expected = [random.random() for _ in range(3)]
    random.setstate(restored)
    assert [random.random() for _ in range(3)] == expected


def test_scalars_containers_and_special_values() -> None:
    state = {
        "nested": [[1, 2, [3.5, None]], [], {}],
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 0.1, 1e308],
        "bools": [True, False, 1, 0],
        "none": None,
        "text": "hello",
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "tuple": (1, (2.0, "x"), []),
        "int_keys": {0: "a", 1: "b"},
        "mixed_keys": {1: "int", "1": "str", None: "none", (1, 2): "tuple", 2.5: "f", float("inf"): "inf"},
        "bool_keys": {True: "t", 5: "i"},
        "reserved": {"__tensor__": "not a tensor", "__tuple__": [1]},
        "big_int": 2**80,
        "ordered": OrderedDict(b=1, a=2),
    }
    restored = round_trip(state)
    # OrderedDict comes back as a plain dict (documented); compare the rest exactly.
    assert restored.pop("ordered") == {"b": 1, "a": 2}
    state.pop("ordered")
    assert_same(state, restored)
    assert math.copysign(1.0, restored["floats"][3]) == -1.0
    assert [type(v) for v in restored["bools"]] == [bool, bool, int, int]


def test_skeleton_is_strict_json_with_tensor_refs() -> None:
    skeleton, tensors = flatten_state({"x": torch.zeros(2), "v": float("nan"), "t": (1,), "d": {0: 1}})
    text = json.dumps(skeleton, allow_nan=False)
    assert "NaN" not in text
    assert skeleton["x"] == {"__tensor__": "x"}
    assert set(tensors) == {"x"}


def test_tensor_dtypes_detach_and_noncontiguous() -> None:
    leaf = torch.randn(3, 4, requires_grad=True)
    state = {
        "grad": leaf * 2,
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.tensor([-(2**40), 7]),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(3.0),
        "empty": torch.empty(0, 3),
        "transposed": torch.arange(6.0).reshape(2, 3).t(),
    }
    skeleton, tensors = flatten_state(state)
    assert all(t.is_contiguous() and not t.requires_grad for t in tensors.values())
    restored = unflatten_state(skeleton, tensors)
    for k, v in state.items():
        assert restored[k].dtype == v.dtype
        assert torch.equal(restored[k], v.detach())


def test_shared_storage_is_copied_and_saves(tmp_path: Path) -> None:
    base = torch.arange(10.0)
    state = {"base": base, "alias": base, "head": base[:4], "tail": base[6:], "dotted.key": torch.ones(1)}
    state["dotted"] = {"key": torch.zeros(1)}  # collides with "dotted.key" as a flat path
    save_part(tmp_path, "shared", state)
    restored = load_part(tmp_path, "shared")
    for k in ("base", "alias", "head", "tail"):
        assert torch.equal(restored[k], state[k])
    assert torch.equal(restored["dotted.key"], torch.ones(1))
    assert torch.equal(restored["dotted"]["key"], torch.zeros(1))
    restored["base"][0] = 99.0  # copies must be independent on load
    assert restored["alias"][0] == 0.0


def test_unsupported_values_name_the_path() -> None:
    with pytest.raises(TypeError, match=r"'a\.b\.1'"):
        flatten_state({"a": {"b": [1, object()]}})
    with pytest.raises(TypeError, match="key of unsupported type"):
        flatten_state({torch.zeros(1): 1})
    with pytest.raises(TypeError, match="dense"):
        flatten_state(torch.zeros(2, 2).to_sparse())


def test_malformed_skeleton_rejected() -> None:
    with pytest.raises(ValueError, match="missing"):
        unflatten_state({"__tensor__": "nope"}, {})
    with pytest.raises(ValueError, match="dtype"):
        unflatten_state({"__dtype__": "os"}, {})
    with pytest.raises(ValueError, match="marker"):
        unflatten_state({"__tuple__": [], "x": 1}, {})
    with pytest.raises(ValueError):
        unflatten_state({"__float__": "1e999"}, {})


# ----------------------------------------------------------------------------------------------------------
# parts on disk
# ----------------------------------------------------------------------------------------------------------


def test_save_load_part_bitwise(tmp_path: Path) -> None:
    model, opt = make_model_and_opt()
    train_step(model, opt, 0)
    state = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "py": random.getstate(),
    }
    save_part(tmp_path, "train", state)
    assert (tmp_path / "train.safetensors").is_file()
    json.loads((tmp_path / "train.json").read_text())  # strict JSON on disk
    restored = load_part(tmp_path, "train", device=torch.device("cpu"))
    restored["model"] = OrderedDict(restored["model"])
    assert_same(state, restored)


def test_part_without_tensors_writes_only_json(tmp_path: Path) -> None:
    save_part(tmp_path, "meta", {"a": [1, 2.5], "b": float("inf")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    assert load_part(tmp_path, "meta") == {"a": [1, 2.5], "b": math.inf}


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "manifest", "COMMIT"])
def test_bad_part_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="part name"):
        save_part(tmp_path, name, {})


# ----------------------------------------------------------------------------------------------------------
# CheckpointManager
# ----------------------------------------------------------------------------------------------------------


def test_keep_last_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_manager_save_load_round_trip(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "checkpoints")
    parts = sample_parts()
    info = mgr.save(7, parts, meta={"epoch": 1, "lr": float("nan"), "tags": ("a",)})
    assert info == CheckpointInfo(path=tmp_path / "checkpoints" / "step_00000007", step=7)
    names = sorted(p.name for p in info.path.iterdir())
    assert names == sorted(["COMMIT", "manifest.json", "model.json", "model.safetensors", "trainer.json"])
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["step"] == 7 and set(manifest["files"]) == {
        "model.json",
        "model.safetensors",
        "trainer.json",
    }
    assert mgr.verify(info) is None
    loaded, meta = mgr.load(info)
    assert_same(parts, loaded)
    assert meta["epoch"] == 1 and math.isnan(meta["lr"]) and meta["tags"] == ("a",)
    assert mgr.latest_valid() == info
    assert resolve_checkpoint(tmp_path) == info
    assert resolve_checkpoint(tmp_path / "checkpoints") == info
    assert resolve_checkpoint(info.path) == info
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, sample_parts(1.0))
    info = mgr.save(5, sample_parts(2.0))
    assert [i.step for i in mgr.committed()] == [5]
    loaded, _ = mgr.load(info)
    assert torch.equal(loaded["model"]["w"], sample_parts(2.0)["model"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]


def test_meta_with_tensor_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta must not contain tensors"):
        CheckpointManager(tmp_path).save(1, {}, meta={"x": torch.zeros(1)})


@pytest.mark.parametrize("crash_point", ["commit_marker", "rename"])
def test_crash_mid_save_keeps_previous_and_is_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_point: str
) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    first = mgr.save(1, sample_parts())

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash")

    with monkeypatch.context() as m:
        if crash_point == "commit_marker":
            m.setattr(ckpt, "_write_commit_marker", boom)
        else:
            m.setattr(ckpt.os, "rename", boom)
        with pytest.raises(OSError, match="simulated crash"):
            mgr.save(2, sample_parts(3.0))

    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # A save that fails before its commit removes its own temp copy (freeing a full disk's space);
    # one that fails at the rename leaves it to the next save, like a killed process would.
    assert len(stale) == (0 if crash_point == "commit_marker" else 1)
    # The failed save must not have pruned the previous checkpoint even though keep_last=1.
    assert mgr.committed() == [first]
    assert mgr.latest_valid() == first
    assert resolve_checkpoint(tmp_path) == first

    # A crashed save by another process leaves a differently named temp dir; clean that up too.
    foreign = tmp_path / ".tmp-step_00000009-999999"
    foreign.mkdir()
    (foreign / "model.json").write_text("{}")

    third = mgr.save(3, sample_parts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]
    assert mgr.latest_valid() == third


def test_uncommitted_dir_is_ignored(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path)
    first = mgr.save(1, sample_parts())
    second = mgr.save(2, sample_parts())
    (second.path / "COMMIT").unlink()
    assert mgr.committed() == [first]
    with pytest.raises(CheckpointError, match="COMMIT"):
        resolve_checkpoint(second.path)


def test_corruption_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    first = mgr.save(10, sample_parts())
    second = mgr.save(20, sample_parts(2.0))
    target = second.path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # flip a byte inside the tensor payload; size stays the same
    target.write_bytes(bytes(data))

    assert "sha256 mismatch" in (mgr.verify(second) or "")
    with caplog.at_level(logging.WARNING, logger="prx_core.checkpoint"):
        assert mgr.latest_valid() == first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(second.path) in warnings[0].getMessage()

    with pytest.raises(CheckpointError, match="step_00000020") as excinfo:
        mgr.load(second)
    assert "sha256 mismatch" in str(excinfo.value)
    with pytest.raises(CheckpointError):
        resolve_checkpoint(second.path)
    assert resolve_checkpoint(tmp_path) == first


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_other_damage_detected(tmp_path: Path, damage: str) -> None:
    mgr = CheckpointManager(tmp_path)
    info = mgr.save(1, sample_parts())
    if damage == "truncate":
        path = info.path / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-4])
        expected = "size mismatch"
    elif damage == "delete":
        (info.path / "trainer.json").unlink()
        expected = "missing file"
    else:
        manifest = info.path / "manifest.json"
        manifest.write_text(manifest.read_text().replace('"step": 1', '"step": 2'))
        expected = "COMMIT"
    assert expected in (mgr.verify(info) or "")
    assert mgr.latest_valid() is None
    with pytest.raises(CheckpointError, match="no valid committed checkpoint"):
        resolve_checkpoint(tmp_path)


def test_pruning_keeps_last_n_after_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=2)
    order: list[str] = []
    real_marker = ckpt._write_commit_marker
    real_rmtree = ckpt.shutil.rmtree

    def marker(directory: Path, digest: str) -> None:
        order.append("commit")
        real_marker(directory, digest)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if "pruned" in os.fspath(path):
            order.append("prune")
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "_write_commit_marker", marker)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    for step in (100, 200, 300, 400):
        mgr.save(step, sample_parts())
        assert len(mgr.committed()) == min(2, step // 100)
    assert [i.step for i in mgr.committed()] == [300, 400]
    assert order == ["commit", "commit", "commit", "prune", "commit", "prune"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000300", "step_00000400"]


def test_saving_older_step_keeps_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(50, sample_parts())
    with caplog.at_level(logging.WARNING, logger="prx_core.checkpoint"):
        older = mgr.save(30, sample_parts())
    assert "newer checkpoints exist" in caplog.text
    # The just-written checkpoint is never the one pruned.
    assert mgr.committed() == [older]


def test_resolve_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no valid committed checkpoint"):
        resolve_checkpoint(tmp_path)
    assert not (tmp_path / "checkpoints").exists()  # resolving must not create directories
