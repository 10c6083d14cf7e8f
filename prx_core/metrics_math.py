"""Distribution distances shared by the evaluation metrics (reference.md §6): Fréchet distance and RBF MMD.

They live in core, once, because several metric plugins need them (FID uses the Fréchet distance;
CMMD and DINO-MMD use the same MMD) and plugins never import each other. Pure torch functions,
computed in float64 whatever the feature dtype: FID subtracts traces of 2048×2048 covariances and
the MMD subtracts kernel means that are all within ~2% of 1, so single precision would lose most
of the significant digits to cancellation.
"""

from __future__ import annotations

import torch

#: reference.md §6: Gaussian RBF bandwidth and output scale of CMMD (and DINO-MMD).
MMD_SIGMA = 10.0
MMD_SCALE = 1000.0


def _as_matrix(name: str, features_ND: torch.Tensor) -> torch.Tensor:
    if not isinstance(features_ND, torch.Tensor) or features_ND.ndim != 2:
        shape = tuple(features_ND.shape) if isinstance(features_ND, torch.Tensor) else type(features_ND).__name__
        raise ValueError(f"{name} must be a 2-D tensor [N, D] of features, got {shape}")
    if features_ND.shape[0] < 1 or features_ND.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one feature vector, got shape {tuple(features_ND.shape)}")
    if not torch.isfinite(features_ND).all():
        raise ValueError(f"{name} contains non-finite values")
    return features_ND.detach().to(dtype=torch.float64)


def mean_and_cov(features_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divided by N − 1, like ``numpy.cov``), in float64."""
    x_ND = _as_matrix("features_ND", features_ND)
    n = x_ND.shape[0]
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {n}")
    mu_D = x_ND.mean(dim=0)
    centred_ND = x_ND - mu_D
    sigma_DD = centred_ND.T @ centred_ND / (n - 1)
    return mu_D, sigma_DD


def _numerical_rank_eigvals(eigvals_D: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with those below its rounding level set to exactly 0.

    A singular covariance has eigenvalues that are 0 in exact arithmetic but ±1e-16·max after
    rounding; their square roots (1e-8·√max each, over hundreds of them) would otherwise add up to
    a visible error, e.g. a nonzero distance between identical feature sets.
    """
    tol = eigvals_D.abs().max() * eigvals_D.shape[0] * torch.finfo(eigvals_D.dtype).eps
    return torch.where(eigvals_D > tol, eigvals_D, torch.zeros_like(eigvals_D))


def _psd_sqrt(sigma_DD: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (numerically) PSD matrix."""
    sym_DD = (sigma_DD + sigma_DD.T) / 2
    eigvals_D, eigvecs_DD = torch.linalg.eigh(sym_DD)
    return (eigvecs_DD * _numerical_rank_eigvals(eigvals_D).sqrt()) @ eigvecs_DD.T


def frechet_distance(
    mu1_D: torch.Tensor, sigma1_DD: torch.Tensor, mu2_D: torch.Tensor, sigma2_DD: torch.Tensor
) -> torch.Tensor:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), a float64 scalar.

    d² = ‖mu1 − mu2‖² + Tr(sigma1) + Tr(sigma2) − 2·Tr((sigma1·sigma2)^½).

    Tr((S1·S2)^½) is the sum of the square roots of the eigenvalues of S1·S2, which equal those of
    the symmetric PSD matrix S1^½·S2·S1^½. Using that form (``eigh`` instead of a general
    ``sqrtm``/``eigvals``) keeps the computation real and stable when the covariances are singular,
    as they are whenever there are fewer samples than feature dimensions (64 images, 2048-d).
    """
    mu1 = mu1_D.detach().to(dtype=torch.float64)
    mu2 = mu2_D.detach().to(dtype=torch.float64)
    s1 = sigma1_DD.detach().to(dtype=torch.float64, device=mu1.device)
    s2 = sigma2_DD.detach().to(dtype=torch.float64, device=mu1.device)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means [D] and covariances [D, D] of one D; got {tuple(mu1.shape)}, "
            f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}"
        )
    root1_DD = _psd_sqrt(s1)
    middle_DD = root1_DD @ s2 @ root1_DD
    middle_DD = (middle_DD + middle_DD.T) / 2
    trace_sqrt = _numerical_rank_eigvals(torch.linalg.eigvalsh(middle_DD)).sqrt().sum()
    diff_D = mu1 - mu2.to(mu1.device)
    return diff_D @ diff_D + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt


def frechet_distance_of_features(features1_ND: torch.Tensor, features2_MD: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussian fits of two feature sets (the FID, given Inception features)."""
    return frechet_distance(*mean_and_cov(features1_ND), *mean_and_cov(features2_MD))


def _kernel_sum(a_ND: torch.Tensor, b_MD: torch.Tensor, gamma: float, chunk: int) -> torch.Tensor:
    """Σ_ij exp(−gamma·‖a_i − b_j‖²), over row blocks of ``a`` so at most chunk×M kernel values exist."""
    b_sq_M = (b_MD * b_MD).sum(dim=1)
    total = torch.zeros((), dtype=a_ND.dtype, device=a_ND.device)
    for start in range(0, a_ND.shape[0], chunk):
        a_CD = a_ND[start : start + chunk]
        a_sq_C = (a_CD * a_CD).sum(dim=1)
        # Expanded form, as the CMMD reference computes it; clamp the tiny negatives rounding makes.
        dist_CM = (a_sq_C[:, None] + b_sq_M[None, :] - 2 * a_CD @ b_MD.T).clamp_min(0)
        total = total + torch.exp(-gamma * dist_CM).sum()
    return total


def mmd_rbf(
    x_ND: torch.Tensor,
    y_MD: torch.Tensor,
    sigma: float = MMD_SIGMA,
    scale: float = MMD_SCALE,
    chunk: int = 2048,
) -> torch.Tensor:
    """Squared MMD with a Gaussian RBF kernel, biased estimator, times ``scale`` (CMMD, reference.md §6).

    k(a, b) = exp(−‖a − b‖² / (2σ²)); MMD² = mean k(x, x') + mean k(y, y') − 2·mean k(x, y), where
    the means run over *all* pairs including i == j (the biased V-statistic the CMMD paper uses,
    arXiv 2401.09603). ``chunk`` bounds memory: kernel matrices are built ``chunk`` rows at a time.
    Returns a float64 scalar on ``x_ND``'s device.
    """
    if sigma <= 0 or chunk < 1:
        raise ValueError(f"sigma must be > 0 and chunk >= 1, got sigma={sigma}, chunk={chunk}")
    x = _as_matrix("x_ND", x_ND)
    y = _as_matrix("y_MD", y_MD).to(x.device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x_ND and y_MD must have the same feature width, got {x.shape[1]} and {y.shape[1]}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    n, m = x.shape[0], y.shape[0]
    k_xx = _kernel_sum(x, x, gamma, chunk) / (n * n)
    k_yy = _kernel_sum(y, y, gamma, chunk) / (m * m)
    k_xy = _kernel_sum(x, y, gamma, chunk) / (n * m)
    return scale * (k_xx + k_yy - 2 * k_xy)
