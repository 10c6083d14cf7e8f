"""Fréchet distance and RBF MMD (reference.md §6) against independent references: numpy + scipy, and a plain
O(n²) double loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prx_core.metrics_math import (
    MMD_SCALE,
    MMD_SIGMA,
    frechet_distance,
    frechet_distance_of_features,
    mean_and_cov,
    mmd_rbf,
)

scipy_linalg = pytest.importorskip("scipy.linalg")


def _features(n: int, d: int, seed: int, shift: float = 0.0, spread: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing_DD = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return shift + spread * torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing_DD


def _scipy_frechet(a_ND: np.ndarray, b_MD: np.ndarray) -> float:
    """pytorch-fid's formula: numpy statistics and scipy's general matrix square root."""
    mu1, mu2 = a_ND.mean(axis=0), b_MD.mean(axis=0)
    s1, s2 = np.cov(a_ND, rowvar=False), np.cov(b_MD, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _loop_mmd(x: list[list[float]], y: list[list[float]], sigma: float, scale: float) -> float:
    """The biased MMD² written out pair by pair, diagonal included."""

    def k(a: list[float], b: list[float]) -> float:
        return math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) / (2 * sigma * sigma))

    k_xx = sum(k(a, b) for a in x for b in x) / (len(x) * len(x))
    k_yy = sum(k(a, b) for a in y for b in y) / (len(y) * len(y))
    k_xy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return scale * (k_xx + k_yy - 2 * k_xy)


# --------------------------------------------------------------------------- mean and covariance


def test_mean_and_cov_match_numpy() -> None:
    x = _features(40, 6, seed=1, shift=3.0)
    mu, sigma = mean_and_cov(x.float())
    assert mu.dtype == torch.float64 and sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.float().double().numpy().mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.float().double().numpy(), rowvar=False), rtol=1e-10)


def test_mean_and_cov_need_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mean_and_cov(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        mean_and_cov(torch.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        mean_and_cov(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_two_gaussians_by_hand() -> None:
    # Diagonal covariances commute: d² = ‖Δμ‖² + Σ (√a − √b)².
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([3.0, -1.0])
    s1, s2 = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([1.0, 9.0]))
    expected = (9 + 4) + (2 - 1) ** 2 + (1 - 3) ** 2
    assert frechet_distance(mu1, s1, mu2, s2).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("n", "m", "d"), [(60, 50, 8), (200, 150, 24)])
def test_frechet_distance_matches_scipy_full_rank(n: int, m: int, d: int) -> None:
    a = _features(n, d, seed=2)
    b = _features(m, d, seed=3, shift=0.4, spread=1.3)
    ours = frechet_distance_of_features(a, b).item()
    assert ours == pytest.approx(_scipy_frechet(a.numpy(), b.numpy()), rel=1e-8)


def test_frechet_distance_matches_scipy_with_fewer_samples_than_dimensions() -> None:
    # The FID regime of a small eval (64 images, 2048-d): both covariances are singular.
    a = _features(12, 30, seed=4)
    b = _features(15, 30, seed=5, shift=0.2)
    ours = frechet_distance_of_features(a, b).item()
    assert ours == pytest.approx(_scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    a = _features(20, 64, seed=6, shift=5.0)
    value = frechet_distance_of_features(a.float(), a.float().clone()).item()
    scale = torch.trace(mean_and_cov(a)[1]).item()
    assert abs(value) < 1e-9 * scale


def test_frechet_distance_is_symmetric_and_grows_with_a_mean_shift() -> None:
    a = _features(50, 10, seed=7)
    b = _features(50, 10, seed=8)
    ab, ba = frechet_distance_of_features(a, b).item(), frechet_distance_of_features(b, a).item()
    assert ab == pytest.approx(ba, rel=1e-9)
    assert frechet_distance_of_features(a, b + 1.0).item() > ab


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


# --------------------------------------------------------------------------- MMD


def test_mmd_of_two_points_by_hand() -> None:
    # One point each: k_xx = k_yy = 1, k_xy = exp(−a²/(2σ²)).
    a = 3.0
    value = mmd_rbf(torch.tensor([[0.0, 0.0]]), torch.tensor([[a, 0.0]])).item()
    assert value == pytest.approx(MMD_SCALE * (2 - 2 * math.exp(-(a**2) / (2 * MMD_SIGMA**2))), rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 4096])
def test_mmd_matches_the_double_loop_for_every_chunk_size(chunk: int) -> None:
    x = _features(9, 5, seed=9)
    y = _features(6, 5, seed=10, shift=0.5)
    expected = _loop_mmd(x.tolist(), y.tolist(), MMD_SIGMA, MMD_SCALE)
    assert mmd_rbf(x, y, chunk=chunk).item() == pytest.approx(expected, rel=1e-9)


def test_mmd_other_bandwidth_and_scale() -> None:
    x = _features(7, 3, seed=11)
    y = _features(8, 3, seed=12, spread=2.0)
    expected = _loop_mmd(x.tolist(), y.tolist(), sigma=1.5, scale=1.0)
    assert mmd_rbf(x, y, sigma=1.5, scale=1.0, chunk=4).item() == pytest.approx(expected, rel=1e-9)


def test_mmd_is_precise_on_normalised_low_precision_features() -> None:
    # CLIP/DINO features are unit vectors: every kernel value is within 2% of 1, so the estimator
    # must compute in float64 even when the features arrive in float32.
    x = torch.nn.functional.normalize(_features(30, 16, seed=13), dim=1).float()
    y = torch.nn.functional.normalize(_features(20, 16, seed=14, shift=0.3), dim=1).float()
    expected = _loop_mmd(x.double().tolist(), y.double().tolist(), MMD_SIGMA, MMD_SCALE)
    ours = mmd_rbf(x, y, chunk=8)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(expected, rel=1e-7)


def test_mmd_of_identical_sets_is_zero_and_shifted_sets_positive() -> None:
    x = torch.nn.functional.normalize(_features(25, 8, seed=15), dim=1)
    assert abs(mmd_rbf(x, x.clone()).item()) < 1e-9
    assert mmd_rbf(x, torch.nn.functional.normalize(x + 0.5, dim=1)).item() > 1e-3


def test_mmd_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same feature width"):
        mmd_rbf(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="sigma"):
        mmd_rbf(torch.zeros(2, 3), torch.zeros(2, 3), sigma=0.0)
    with pytest.raises(ValueError, match="2-D"):
        mmd_rbf(torch.zeros(3), torch.zeros(2, 3))
