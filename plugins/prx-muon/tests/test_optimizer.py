"""MuonAdamW on one process: against an unbatched reference, torch's AdamW and torch's Muon;
state dtypes; exact state_dict round trips; config validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from prx_muon import MuonConfig
from prx_muon.optimizer import MuonAdamW

from prx_core.checkpoint import load_part, save_part

A, B, C = 3.4445, -4.7750, 2.0315
#: Shapes with repeats (batched together), tall, wide and square matrices.
SHAPES = [(24, 16), (16, 40), (24, 16), (8, 8), (16, 40), (24, 16), (3, 50)]


def reference_orthogonalise(G: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """One matrix, written the plain way (Keller Jordan's formulation), no batching."""
    X = G.to(dtype)
    if G.shape[0] > G.shape[1]:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        gram = X @ X.T
        X = A * X + (B * gram + C * gram @ gram) @ X
    if G.shape[0] > G.shape[1]:
        X = X.T
    return X


class ReferenceMuon:
    """Unbatched Muon: a Python loop over matrices, nothing shared with the implementation."""

    def __init__(
        self, params: list[torch.Tensor], lr: float, momentum: float, nesterov: bool, wd: float, dtype: torch.dtype
    ):
        self.params, self.lr, self.momentum, self.nesterov, self.wd, self.dtype = (
            params,
            lr,
            momentum,
            nesterov,
            wd,
            dtype,
        )
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        for p, buf in zip(self.params, self.bufs, strict=True):
            g = p.grad
            buf.copy_(self.momentum * buf + g)
            u = g + self.momentum * buf if self.nesterov else buf
            o = reference_orthogonalise(u, 5, self.dtype).float()
            m, n = p.shape
            p.copy_(p * (1 - self.lr * self.wd) - self.lr * 0.2 * math.sqrt(max(m, n)) * o)


def _params(shapes: list[tuple[int, ...]], seed: int, dtype: torch.dtype | None = None) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        value = torch.randn(*shape, generator=generator) * 0.05
        out.append(torch.nn.Parameter(value if dtype is None else value.to(dtype)))
    return out


def _set_grads(groups: list[list[torch.Tensor]], step: int) -> None:
    """Same gradients for every copy of the parameters."""
    generator = torch.Generator().manual_seed(100 + step)
    for tensors in zip(*groups, strict=True):
        grad = torch.randn(tensors[0].shape, generator=generator)
        for t in tensors:
            t.grad = grad.to(t.dtype)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
# "auto" is one matrix per matmul on this CPU; None batches every same-shape group (a GPU's "auto").
@pytest.mark.parametrize("ns_max_batch", ["auto", None])
def test_muon_matches_unbatched_reference(nesterov: bool, ns_dtype: torch.dtype, ns_max_batch: str | None) -> None:
    ours, theirs = _params(SHAPES, 0), _params(SHAPES, 0)
    optimizer = MuonAdamW(
        ours, [], ns_dtype=ns_dtype, lr=1e-2, nesterov=nesterov, weight_decay=0.1, ns_max_batch=ns_max_batch
    )
    reference = ReferenceMuon(theirs, lr=1e-2, momentum=0.95, nesterov=nesterov, wd=0.1, dtype=ns_dtype)
    for step in range(3):
        _set_grads([ours, theirs], step)
        optimizer.step()
        reference.step()
    # fp32: only summation order differs. bf16: the fused baddbmm rounds once where the plain
    # formula rounds after every op; each is 1-4% (relative Frobenius) away from fp32
    # Newton–Schulz (ours about 1.5%, the plain formula about 3%), so they differ by up to ~4%.
    tol = 1e-5 if ns_dtype == torch.float32 else 6e-2
    for a, b, start in zip(ours, theirs, _params(SHAPES, 0), strict=True):
        moved_a, moved_b = a.detach() - start, b.detach() - start
        assert moved_b.norm() > 0, "parameter did not move"
        error = ((moved_a - moved_b).norm() / moved_b.norm()).item()
        assert error < tol, (tuple(a.shape), error)
    for a, b in zip(ours, reference.bufs, strict=True):
        torch.testing.assert_close(optimizer.state[a]["momentum_buffer"], b)


def test_muon_update_size_follows_the_scale() -> None:
    # One step from zero momentum, wd 0: ΔW = −lr·0.2·√max(m,n)·O, and O has RMS ≈ 1/√min(m,n)·‖σ‖.
    (p,) = _params([(64, 256)], 1)
    before = p.detach().clone()
    optimizer = MuonAdamW([p], [], ns_dtype=torch.float32, lr=1e-3)
    p.grad = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    optimizer.step()
    delta = (p.detach() - before) / (-1e-3 * 0.2 * 16)
    sv = torch.linalg.svdvals(delta)
    assert 0.6 < sv.min().item() and sv.max().item() < 1.3


def test_agrees_with_torch_optim_muon() -> None:
    # torch.optim.Muon keeps an EMA momentum ((1-β) times ours); Newton–Schulz normalises the
    # scale away, so with "match_rms_adamw" the two agree up to bf16 rounding.
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    ours, theirs = _params(SHAPES, 2), _params(SHAPES, 2)
    optimizer = MuonAdamW(ours, [], ns_dtype=torch.bfloat16, lr=1e-2, weight_decay=0.1)
    reference = torch.optim.Muon(theirs, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for step in range(3):
        _set_grads([ours, theirs], step)
        optimizer.step()
        reference.step()
    for a, b, s in zip(ours, theirs, start, strict=True):
        moved = (b - s).abs().max().item()
        assert (a - b).abs().max().item() < 0.05 * moved


def test_adamw_group_is_bitwise_torch_adamw() -> None:
    shapes = [(7,), (5, 3), (1, 1, 4)]
    ours, theirs = _params(shapes, 3), _params(shapes, 3)
    optimizer = MuonAdamW([], ours, ns_dtype=torch.float32, lr=1e-2, adamw_weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
    for step in range(4):
        _set_grads([ours, theirs], step)
        optimizer.step()
        reference.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"])


def test_adam_group_default_eps_is_the_references_1e8_written_out_as_the_adamw_formula() -> None:
    """reference.md §8: the reference's Muon configuration gives its Adam group eps 1e-8.

    Two steps on gradients of order 1e-8, where eps is not negligible against √v̂ (with the AdamW
    baseline's 1e-15 the update would be about lr·sign(g) instead), checked against AdamW written
    out in float64: m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g², w ← w − lr·(m/(1 − β1ᵗ)) /
    (√(v/(1 − β2ᵗ)) + eps).
    """
    config = MuonConfig()
    assert config.adamw_eps == 1e-8 and config.adamw_betas == (0.9, 0.95) and config.adamw_weight_decay == 0.0
    start = torch.tensor([0.5, -0.25, 0.125, 1.0])
    grads = [torch.tensor([1e-8, -3e-8, 2e-9, 0.0]), torch.tensor([-2e-8, 1e-8, 5e-9, 4e-8])]
    (param,) = [torch.nn.Parameter(start.clone())]
    optimizer = MuonAdamW([], [param], ns_dtype=torch.float32, lr=1e-2)  # eps: the constructor's default
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.95, 1e-8
    w, m, v = start.double(), torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for t, grad in enumerate(grads, start=1):
        param.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w = w - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
        torch.testing.assert_close(param.detach().double(), w, rtol=0, atol=1e-7)
    # The check is sensitive to eps: the baseline's 1e-15 moves the first weight by lr, not lr/2.
    (other,) = [torch.nn.Parameter(start.clone())]
    baseline_eps = MuonAdamW([], [other], ns_dtype=torch.float32, lr=1e-2, adamw_eps=1e-15)
    other.grad = grads[0].clone()
    baseline_eps.step()
    assert other[0].item() == pytest.approx(0.5 - lr, abs=1e-7)


def test_bf16_weights_keep_fp32_state_and_round_once() -> None:
    # Moments are computed from the (exactly representable) bf16 gradients in fp32, so they equal
    # torch AdamW's moments on an fp32 copy; the weight is the fp32 result rounded to bf16.
    ours = _params([(6, 10), (10,)], 4, torch.bfloat16)
    theirs = [torch.nn.Parameter(p.detach().float()) for p in ours]
    optimizer = MuonAdamW(
        [ours[0]], [ours[1]], ns_dtype=torch.float32, lr=1e-2, state_dtype=torch.float32, momentum=0.9
    )
    reference = torch.optim.AdamW([theirs[1]], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, foreach=True)
    _set_grads([ours], 0)
    for p, q in zip(ours, theirs, strict=True):
        q.grad = p.grad.float()
    optimizer.step()
    reference.step()
    for p in ours:
        assert p.dtype == torch.bfloat16
        assert all(v.dtype == torch.float32 for v in optimizer.state[p].values() if isinstance(v, torch.Tensor))
    assert torch.equal(optimizer.state[ours[1]]["exp_avg"], reference.state[theirs[1]]["exp_avg"])
    torch.testing.assert_close(ours[1].float(), theirs[1].detach().bfloat16().float(), rtol=0, atol=0)


def _round_trip(optimizer: MuonAdamW, directory: Path) -> dict:
    """Through the checkpoint format (JSON skeleton + safetensors), as the trainer saves it."""
    save_part(directory, "optimizer", optimizer.state_dict())
    return load_part(directory, "optimizer")


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_state_dict_round_trip_is_exact(tmp_path: Path, weights: str) -> None:
    dtype = getattr(torch, weights)
    shapes = [(24, 16), (24, 16), (16, 40), (16,), (3, 4, 5)]

    def make(params: list[torch.nn.Parameter]) -> tuple[MuonAdamW, torch.optim.lr_scheduler.LambdaLR]:
        opt = MuonAdamW(params[:3], params[3:], ns_dtype=torch.bfloat16, lr=1e-2, state_dtype=torch.float32)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))

    first_params = _params(shapes, 6, dtype)
    first, first_schedule = make(first_params)
    for step in range(2):
        _set_grads([first_params], step)
        first.step()
        first_schedule.step()
    saved = _round_trip(first, tmp_path)
    second_params = [torch.nn.Parameter(p.detach().clone()) for p in first_params]
    second, second_schedule = make(second_params)
    second.load_state_dict(saved)
    second_schedule.load_state_dict(first_schedule.state_dict())
    for a, b in zip(first_params, second_params, strict=True):
        for key, value in first.state[a].items():
            other = second.state[b][key]
            assert (
                (torch.equal(value, other) and value.dtype == other.dtype == torch.float32)
                if isinstance(value, torch.Tensor)
                else value == other
            )
    assert [g["lr"] for g in second.param_groups] == [g["lr"] for g in first.param_groups]
    for step in range(2, 4):
        _set_grads([first_params, second_params], step)
        first.step()
        second.step()
    for a, b in zip(first_params, second_params, strict=True):
        assert torch.equal(a, b)


def test_empty_muon_group_is_plain_adamw_and_validation() -> None:
    (p,) = _params([(4, 4)], 7)
    optimizer = MuonAdamW([], [p], ns_dtype=torch.float32)
    assert [len(g["params"]) for g in optimizer.param_groups] == [0, 1]
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW(_params([(4,)], 0), [], ns_dtype=torch.float32)
    with pytest.raises(ValueError, match="no parameters"):
        MuonAdamW([], [], ns_dtype=torch.float32)
    bad_configs = (
        {"lr": 0.0},
        {"momentum": 1.0},
        {"ns_steps": 0},
        {"ns_dtype": "float16"},
        {"adamw_betas": (0.9, 1.0)},
        {"ns_max_batch": 0},
        {"ns_max_batch": "all"},
    )
    for bad in bad_configs:
        with pytest.raises(ValueError):
            MuonConfig(**bad)  # type: ignore[arg-type]
