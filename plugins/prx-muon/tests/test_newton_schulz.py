"""Newton–Schulz: singular values near 1, hand-computable cases, batching, transposition."""

from __future__ import annotations

import math

import pytest
import torch
from prx_muon.newton_schulz import NS_COEFFICIENTS, newton_schulz, update_scale

DTYPES = [torch.float32, torch.bfloat16]


def _quintic(x: float, steps: int) -> float:
    """The scalar map a singular value follows: x ← a·x + b·x³ + c·x⁵."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 128), (32, 512)])
def test_singular_values_of_random_rectangular_matrices_are_near_one(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(0)
    updates_Nmn = torch.randn(6, *shape, generator=generator)
    ortho = newton_schulz(updates_Nmn, 5, dtype)
    assert ortho.dtype == dtype and ortho.shape == updates_Nmn.shape
    sv = torch.linalg.svdvals(ortho.float())
    # The quintic trades exactness for speed: 5 steps land in roughly [0.68, 1.14], not at 1.
    assert 0.6 <= sv.min().item() and sv.max().item() <= 1.3, (sv.min().item(), sv.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_square_random_matrices_bulk_of_spectrum_near_one(dtype: torch.dtype) -> None:
    # Square Gaussian matrices have singular values arbitrarily close to 0 that 5 steps cannot
    # lift; the bulk still lands in the band.
    generator = torch.Generator().manual_seed(1)
    sv = torch.linalg.svdvals(newton_schulz(torch.randn(8, 64, 64, generator=generator), 5, dtype).float())
    in_band = ((sv >= 0.6) & (sv <= 1.3)).float().mean().item()
    assert in_band > 0.97, in_band
    assert sv.max().item() <= 1.3


def test_diagonal_matrix_follows_the_scalar_quintic() -> None:
    # diag(s) stays diagonal: each entry is s_i/‖s‖ pushed through the scalar polynomial 5 times.
    s = [3.0, 2.0, 1.0, 0.5]
    norm = math.sqrt(sum(v * v for v in s))
    expected = torch.tensor([_quintic(v / norm, 5) for v in s])
    ortho = newton_schulz(torch.diag(torch.tensor(s))[None], 5, torch.float32, eps=0.0)[0]
    torch.testing.assert_close(torch.diagonal(ortho), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ortho - torch.diag(torch.diagonal(ortho)), torch.zeros(4, 4), rtol=0, atol=1e-6)


def test_rectangular_diagonal_matrix() -> None:
    # A 2×3 matrix [[2,0,0],[0,1,0]]: singular values 2 and 1, right singular vectors e1, e2.
    G = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    norm = math.sqrt(5.0)
    expected = torch.tensor([[_quintic(2 / norm, 5), 0.0, 0.0], [0.0, _quintic(1 / norm, 5), 0.0]])
    torch.testing.assert_close(newton_schulz(G[None], 5, torch.float32, eps=0.0)[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(newton_schulz(G.T[None], 5, torch.float32, eps=0.0)[0], expected.T, rtol=1e-5, atol=1e-6)


def test_batched_equals_one_matrix_at_a_time() -> None:
    generator = torch.Generator().manual_seed(2)
    batch = torch.randn(5, 24, 40, generator=generator)
    together = newton_schulz(batch, 5, torch.float32)
    for i in range(5):
        torch.testing.assert_close(together[i], newton_schulz(batch[i : i + 1], 5, torch.float32)[0])


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("max_batch", [1, 2, 3, 5, 8])
def test_capped_batches_equal_the_whole_batch(shape: tuple[int, int], max_batch: int) -> None:
    # max_batch only changes how many matrices share one matmul (1 on a CPU): same maths.
    generator = torch.Generator().manual_seed(5)
    batch = torch.randn(5, *shape, generator=generator)
    capped = newton_schulz(batch, 5, torch.float32, max_batch=max_batch)
    assert capped.shape == batch.shape
    torch.testing.assert_close(capped, newton_schulz(batch, 5, torch.float32))


def test_rejects_a_batch_cap_below_one() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        newton_schulz(torch.zeros(2, 4, 4), 5, torch.float32, max_batch=0)


def test_transpose_commutes() -> None:
    generator = torch.Generator().manual_seed(3)
    G = torch.randn(2, 48, 16, generator=generator)
    torch.testing.assert_close(newton_schulz(G.mT, 5, torch.float32), newton_schulz(G, 5, torch.float32).mT)


def test_zero_matrix_stays_zero_and_scale_invariance() -> None:
    assert torch.equal(newton_schulz(torch.zeros(1, 8, 4), 5, torch.float32), torch.zeros(1, 8, 4))
    generator = torch.Generator().manual_seed(4)
    G = torch.randn(1, 8, 12, generator=generator)
    torch.testing.assert_close(newton_schulz(1e3 * G, 5, torch.float32), newton_schulz(G, 5, torch.float32))


def test_rejects_non_batched_input() -> None:
    with pytest.raises(ValueError, match=r"\[N, m, n\]"):
        newton_schulz(torch.zeros(4, 4), 5, torch.float32)


def test_update_scale() -> None:
    assert update_scale(1792, 6272) == pytest.approx(0.2 * math.sqrt(6272))
    assert update_scale(100, 25) == pytest.approx(2.0)
    assert update_scale(4, 4) == pytest.approx(0.4)
