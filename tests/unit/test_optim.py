"""The builtin ``adamw``: torch's AdamW for fp32 weights; fp32 moments and one rounding for bf16 weights."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prx_core.builtins.adamw import AdamWConfig, _build
from prx_core.optim import StateDtypeAdamW
from prx_core.testing.fixtures import make_trainer, parameters_vector, run_steps, tiny_recipe

CONFIG = AdamWConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _module(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(dtype)


def _run(module: torch.nn.Module, dtype: torch.dtype) -> SimpleNamespace:
    """The slice of a RunContext the factory reads."""
    objects = {
        "trainable": module,
        "precision": SimpleNamespace(param_dtype=dtype, state_dtype=torch.float32),
    }
    return SimpleNamespace(device=torch.device("cpu"), require=objects.__getitem__)


def _grads(module: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


Trained = tuple[torch.nn.Module, torch.optim.Optimizer]


def _assert_same_steps(first: Trained, second: Trained, steps: int) -> None:
    """Step both optimizers on the same gradients; the weights must stay bitwise equal."""
    for step in range(steps):
        for module, optimizer in (first, second):
            _grads(module, step)
            optimizer.step()
    for a, b in zip(first[0].parameters(), second[0].parameters(), strict=True):
        assert torch.equal(a, b)


def test_fp32_weights_get_torch_adamw_bitwise() -> None:
    ours_module, ref_module = _module(torch.float32), _module(torch.float32)
    ours = _build(CONFIG, _run(ours_module, torch.float32))
    assert type(ours) is torch.optim.AdamW  # the plain torch path, untouched
    ref = torch.optim.AdamW(ref_module.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    _assert_same_steps((ours_module, ours), (ref_module, ref), steps=3)


def test_bf16_weights_equal_an_fp32_reference_rounded_to_bf16() -> None:
    """Ours on bf16 weights == torch AdamW (fp32 weights and moments) on an fp32 copy, rounded each step."""
    module = _module(torch.bfloat16)
    optimizer = _build(CONFIG, _run(module, torch.bfloat16))
    assert isinstance(optimizer, StateDtypeAdamW) and optimizer.state_dtype == torch.float32
    # Independent reference: torch's own AdamW on fp32 tensors holding the current bf16 values.
    reference = [p.detach().float().clone().requires_grad_() for p in module.parameters()]
    ref_opt = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    before = [p.detach().clone() for p in module.parameters()]
    for step in range(4):
        _grads(module, step)
        for r, p in zip(reference, module.parameters(), strict=True):
            r.grad = p.grad.float()
        optimizer.step()
        ref_opt.step()
        with torch.no_grad():
            for r, p in zip(reference, module.parameters(), strict=True):
                assert torch.equal(p, r.to(torch.bfloat16)), f"step {step}: not the fp32 update rounded once"
                r.copy_(r.to(torch.bfloat16).float())  # the reference stores in bf16 too
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    state = optimizer.state[next(iter(module.parameters()))]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32 and state["step"] == 4
    for p, r in zip(module.parameters(), ref_opt.param_groups[0]["params"], strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"])


def test_bf16_update_is_not_a_bf16_computation() -> None:
    """Negative control: doing the same update in bf16 arithmetic (torch AdamW on bf16) differs."""
    ours_module, bf16_module = _module(torch.bfloat16), _module(torch.bfloat16)
    ours = _build(CONFIG, _run(ours_module, torch.bfloat16))
    naive = torch.optim.AdamW(bf16_module.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(3):
        _grads(ours_module, step)
        _grads(bf16_module, step)
        ours.step()
        naive.step()
    assert any(not torch.equal(a, b) for a, b in zip(ours_module.parameters(), bf16_module.parameters(), strict=True))


def test_state_dict_round_trip_keeps_fp32_moments_and_resumes_exactly() -> None:
    module = _module(torch.bfloat16)
    optimizer = _build(CONFIG, _run(module, torch.bfloat16))
    _grads(module, 0)
    optimizer.step()
    saved_weights = copy.deepcopy(module.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    _grads(module, 1)
    optimizer.step()
    expected = [p.detach().clone() for p in module.parameters()]

    twin = _module(torch.bfloat16)
    twin.load_state_dict(saved_weights)
    twin_opt = _build(CONFIG, _run(twin, torch.bfloat16))
    twin_opt.load_state_dict(saved)  # torch's loader would cast the moments to bf16 here
    assert all(v["exp_avg"].dtype == torch.float32 for v in twin_opt.state.values())
    _grads(twin, 1)
    twin_opt.step()
    for a, b in zip(twin.parameters(), expected, strict=True):
        assert torch.equal(a, b)


def test_buckets_do_not_change_the_result() -> None:
    a, b = _module(torch.bfloat16), _module(torch.bfloat16)
    whole = StateDtypeAdamW(a.parameters(), state_dtype=torch.float32, lr=1e-2)
    split = StateDtypeAdamW(b.parameters(), state_dtype=torch.float32, lr=1e-2, bucket_elements=7)
    _assert_same_steps((a, whole), (b, split), steps=2)


def test_rejects_bad_arguments() -> None:
    params = list(_module(torch.bfloat16).parameters())
    with pytest.raises(ValueError, match="lr must be > 0"):
        StateDtypeAdamW(params, state_dtype=torch.float32, lr=0.0)
    with pytest.raises(ValueError, match="state_dtype must be a floating-point"):
        StateDtypeAdamW(params, state_dtype=torch.int32)


def test_bf16_weights_with_builtin_adamw_trains_and_resumes_exactly(tmp_path: Path) -> None:
    patch = {"precision": {"use": "bf16_weights"}}
    first = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run")
    run_steps(first, 2)
    assert {p.dtype for p in first.run.require("trainable").parameters()} == {torch.bfloat16}
    floats = {
        v.dtype
        for s in first.optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    assert floats == {torch.float32}
    first.save()
    expected = run_steps(first, 2)
    second = make_trainer(tiny_recipe(tmp_path / "r", patch), tmp_path / "run", resume="auto")  # guard runs here
    assert run_steps(second, 2) == expected
    assert torch.equal(parameters_vector(second), parameters_vector(first))
