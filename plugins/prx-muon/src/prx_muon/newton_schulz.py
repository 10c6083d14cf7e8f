"""Newton–Schulz orthogonalisation, batched over same-shape matrices (reference.md §4, Muon).

The quintic iteration X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ pushes every singular value of a
matrix with spectral norm ≤ 1 towards 1 (Keller Jordan's coefficients maximise the slope at 0;
the result has singular values roughly in [0.7, 1.2] rather than exactly 1, which does not hurt
training). Everything here is ``[N, m, n]`` batched: one ``baddbmm`` per term for a whole group
of same-shape matrices, instead of a Python loop over parameters (on a CPU, one matrix at a time
is faster, and the optimizer asks for that with ``max_batch=1``).
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
    max_batch: int | None = None,
) -> torch.Tensor:
    """Approximately orthogonalise each matrix of ``updates_Nmn`` (shape ``[N, m, n]``).

    Computes in ``dtype`` and returns ``[N, m, n]`` in ``dtype`` (a transposed view for tall
    matrices: callers add it to weights, which reads any strides, so no copy is made). Each
    matrix is first divided by its Frobenius norm (+ ``eps``), which bounds its spectral norm by
    1 so the iteration converges. Tall matrices (m > n) are transposed so the Gram matrix is the
    smaller ``min(m, n)²`` one.

    ``max_batch`` caps how many matrices one matmul covers (``None``: all ``N``). On a GPU the
    whole batch is one kernel per term, which is the point; on a CPU a batch of large matrices
    spills out of the caches between the five iterations, and one matrix at a time is faster
    (bench/optimizer_step.py), so the optimizer passes 1 there.
    """
    if updates_Nmn.ndim != 3:
        raise ValueError(f"newton_schulz expects a [N, m, n] batch, got shape {tuple(updates_Nmn.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
    X = updates_Nmn.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    count = X.shape[0]
    if steps == 0:
        result_Nsl = X
    elif max_batch is None or max_batch >= count:
        result_Nsl = _iterate(X, steps, coefficients)
    else:
        result_Nsl = torch.empty(X.shape, dtype=dtype, device=X.device)
        for chunk_Ksl, out_Ksl in zip(X.split(max_batch), result_Nsl.split(max_batch), strict=True):
            _iterate(chunk_Ksl, steps, coefficients, out=out_Ksl)
    return result_Nsl.mT if tall else result_Nsl


def _iterate(
    X_Ksl: torch.Tensor, steps: int, coefficients: tuple[float, float, float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """``steps`` quintic iterations on ``[K, short, long]`` matrices; the last one writes into ``out``.

    A single matrix runs as 2-D ``addmm`` (the BLAS call takes β·C itself; ``baddbmm`` copies C
    first on a CPU).
    """
    a, b, c = coefficients
    single = X_Ksl.shape[0] == 1
    X = X_Ksl[0] if single else X_Ksl
    gram = torch.addmm if single else torch.baddbmm
    for step in range(steps):
        A = X @ X.mT
        B = gram(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        last_out = None if out is None or step < steps - 1 else (out[0] if single else out)
        X = gram(X, B, X, beta=a, out=last_out)  # a·X + B·X
    return X[None] if single else X


def update_scale(rows: int, cols: int) -> float:
    """0.2·√max(m, n): gives the orthogonalised update the RMS of a typical AdamW update, so the
    AdamW learning rate carries over (Moonshot, "Muon is Scalable for LLM Training", arXiv 2502.16982)."""
    return 0.2 * math.sqrt(max(rows, cols))
