"""Newton–Schulz orthogonalisation, batched over same-shape matrices (SPEC §4, Muon).

The quintic iteration X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ pushes every singular value of a
matrix with spectral norm ≤ 1 towards 1 (Keller Jordan's coefficients maximise the slope at 0;
the result has singular values roughly in [0.7, 1.2] rather than exactly 1, which does not hurt
training). Everything here is ``[N, m, n]`` batched: one ``baddbmm`` per term for a whole group
of same-shape matrices, instead of a Python loop over parameters.
"""

from __future__ import annotations

import math

import torch

#: (a, b, c) of the quintic, from Keller Jordan's Muon (https://kellerjordan.github.io/posts/muon/).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
#: Guards the Frobenius normalisation of an all-zero update (e.g. padding in distributed batches).
NS_EPS = 1e-7


def newton_schulz(
    updates_Nmn: torch.Tensor,
    steps: int,
    dtype: torch.dtype,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
) -> torch.Tensor:
    """Approximately orthogonalise each matrix of ``updates_Nmn`` (shape ``[N, m, n]``).

    Computes in ``dtype`` and returns in ``dtype``. Each matrix is first divided by its
    Frobenius norm (+ ``eps``), which bounds its spectral norm by 1 so the iteration converges.
    Tall matrices (m > n) are transposed so the Gram matrix is the smaller ``min(m, n)²`` one.
    """
    if updates_Nmn.ndim != 3:
        raise ValueError(f"newton_schulz expects a [N, m, n] batch, got shape {tuple(updates_Nmn.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a, b, c = coefficients
    X = updates_Nmn.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.baddbmm(X, B, X, beta=a)  # a·X + B·X
    if tall:
        X = X.mT
    return X.contiguous()


def update_scale(rows: int, cols: int) -> float:
    """0.2·√max(m, n): gives the orthogonalised update the RMS of a typical AdamW update, so the
    AdamW learning rate carries over (Moonshot, "Muon is Scalable for LLM Training", arXiv 2502.16982)."""
    return 0.2 * math.sqrt(max(rows, cols))
