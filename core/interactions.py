"""From SPQE samples to the quadratic model Delta(q) = a.q + q.K.q (METHOD.md).

D holds one marginal vector d_m per row. phi is its mean, C its sample covariance,
K = (1 - alpha) C + alpha diag(C) the covariance shrunk toward its diagonal, and
a_i = phi_i - sum_{j != i} K_ij the individual sensitivity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuadraticModel:
    phi: np.ndarray   # [L] Shapley estimates, the mean of d over samples
    se: np.ndarray    # [L] standard errors of phi
    C: np.ndarray     # [L, L] sample covariance of d
    K: np.ndarray     # [L, L] C shrunk toward its diagonal
    a: np.ndarray     # [L] individual sensitivities
    samples: int      # M, the rows of D


def quadratic_model(D: np.ndarray, alpha: float = 0.5, paired: bool = False) -> QuadraticModel:
    """Fit the quadratic model to the marginal vectors D [M, L].

    paired: rows (2j, 2j+1) are antithetic pairs (a permutation and its reverse). The
    pairs, not the rows, are then the independent draws, so se and C come from the
    per-pair averages; an odd trailing row still counts toward phi.
    """
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] == 0:
        raise ValueError(f"D must be a non-empty [M, L] array, got shape {D.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not np.all(np.isfinite(D)):
        raise ValueError("D holds NaN or infinite marginals; such samples must be left out "
                         "(RunDir.D() does)")
    M, L = D.shape
    phi = D.mean(axis=0)
    draws = D[: M - M % 2].reshape(-1, 2, L).mean(axis=1) if paired else D
    n = draws.shape[0]
    if n >= 2:
        X = draws - draws.mean(axis=0)
        C = X.T @ X / (n - 1)
        se = np.sqrt(np.diag(C) / n)
    else:
        C, se = np.zeros((L, L)), np.zeros(L)
    K = (1 - alpha) * C + alpha * np.diag(np.diag(C))
    a = phi - (K.sum(axis=1) - np.diag(K))
    return QuadraticModel(phi=phi, se=se, C=C, K=K, a=a, samples=M)


def predicted_delta(model: QuadraticModel | tuple[np.ndarray, np.ndarray], q) -> float:
    """Delta(q) = a.q + q.K.q, the predicted loss increase of allocation q (1 = low precision)."""
    a, K = (model.a, model.K) if isinstance(model, QuadraticModel) else model
    q = np.asarray(q, dtype=np.float64)
    return float(np.asarray(a) @ q + q @ np.asarray(K) @ q)
