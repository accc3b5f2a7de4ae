"""From SPQE samples to the quadratic model Delta(q) = a.q + q.K.q (METHOD.md).

D holds one marginal vector d_m per row. phi is its mean, C its sample covariance,
K = (1 - alpha) C + alpha diag(C) the covariance shrunk toward its diagonal, and
a_i = phi_i - sum_{j != i} K_ij the individual sensitivity.

budget_local_model() is our extension, not the paper's (README, "Quality"): the same
model from marginals weighted by where in their permutation they were measured, centred
on the number of 2-bit layers the budget implies. The Shapley value averages a layer's
marginal over every position alike; a budget that leaves 27 of 30 layers at 2 bits is
decided among states of about that size, where a saturated loss makes the marginals
small and ranks the layers differently.
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
    # q.K.q = d.q + |F q|^2 for every binary q (q_i^2 = q_i), with F [n, L] the scaled,
    # centred draws behind C: the solver's compact form when n < L (core.solver).
    factor: tuple[np.ndarray, np.ndarray] | None = None


def quadratic_model(D: np.ndarray, alpha: float = 0.5, paired: bool = False,
                    weights: np.ndarray | None = None) -> QuadraticModel:
    """Fit the quadratic model to the marginal vectors D [M, L].

    paired: rows (2j, 2j+1) are antithetic pairs (a permutation and its reverse). The
    pairs, not the rows, are then the independent draws, so se and C come from the
    per-pair averages; an odd trailing row still counts toward phi.
    weights: [M, L] non-negative weight of each marginal d_m[i]. phi_i is then the
    weighted mean, C_ij = sum_m w_mi w_mj x_mi x_mj / sum_m w_mi w_mj (x = d - phi), and
    se_i uses Kish's effective sample size; rows count as the draws even when paired.
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
    if weights is not None:
        return _weighted_model(D, np.asarray(weights, dtype=np.float64), alpha)
    phi = D.mean(axis=0)
    draws = D[: M - M % 2].reshape(-1, 2, L).mean(axis=1) if paired else D
    n = draws.shape[0]
    if n >= 2:
        X = draws - draws.mean(axis=0)
        C = X.T @ X / (n - 1)
        se = np.sqrt(np.diag(C) / n)
        factor = (alpha * np.diag(C), np.sqrt((1 - alpha) / (n - 1)) * X)
    else:
        C, se = np.zeros((L, L)), np.zeros(L)
        factor = (np.zeros(L), np.zeros((0, L)))
    return _shrunk(phi, se, C, alpha, M, factor)


def _shrunk(phi, se, C, alpha: float, M: int, factor=None) -> QuadraticModel:
    K = (1 - alpha) * C + alpha * np.diag(np.diag(C))
    a = phi - (K.sum(axis=1) - np.diag(K))
    return QuadraticModel(phi=phi, se=se, C=C, K=K, a=a, samples=M, factor=factor)


def _weighted_model(D: np.ndarray, W: np.ndarray, alpha: float) -> QuadraticModel:
    M, L = D.shape
    if W.shape != D.shape or not np.all(np.isfinite(W)) or np.any(W < 0):
        raise ValueError(f"weights must be a finite, non-negative [M, L] array like D {D.shape}")
    total = W.sum(axis=0)
    if np.any(total <= 0):
        raise ValueError("every layer needs some weight: a column of weights sums to zero")
    phi = (W * D).sum(axis=0) / total
    WX = W * (D - phi)
    pair_weight = W.T @ W
    C = np.divide(WX.T @ WX, pair_weight, out=np.zeros((L, L)), where=pair_weight > 0)
    n_eff = total ** 2 / np.maximum((W ** 2).sum(axis=0), 1e-300)
    se = np.sqrt(np.diag(C) / n_eff) if M >= 2 else np.zeros(L)
    return _shrunk(phi, se, C, alpha, M)


def drop_order(sequence, steps: int) -> np.ndarray:
    """The drop indices (i*S + k) of a sequence of layers in which layer i's k-th
    appearance is its k-th step; with one step it is the sequence itself."""
    sequence = np.asarray(sequence, dtype=np.int64)
    if steps == 1:
        return sequence
    taken: dict[int, int] = {}
    out = np.empty_like(sequence)
    for n, i in enumerate(sequence.tolist()):
        k = taken.get(i, 0)
        taken[i] = k + 1
        out[n] = i * steps + k
    return out


def positions(perms: np.ndarray) -> np.ndarray:
    """[M, L]: the 1-based step at which each layer is lowered in each permutation."""
    perms = np.asarray(perms)
    return np.argsort(perms, axis=1) + 1


def budget_local_weights(perms: np.ndarray, low_share: float, width: float | None = None) -> np.ndarray:
    """Gaussian weights over walk positions, centred where the walk crosses the state with
    round(low_share * L) layers at 2 bits: a marginal measured at step k moves from k - 1
    to k low layers, so steps k* and k* + 1 straddle that state. Width L / 8 by default
    (about 4 positions for 30 to 32 layers; chosen on held-out calibration walks, README)."""
    if not 0.0 <= low_share <= 1.0:
        raise ValueError(f"low_share must lie in [0, 1], got {low_share}")
    pos = positions(perms)
    L = pos.shape[1]
    width = max(1.0, L / 8) if width is None else float(width)
    centre = low_share * L + 0.5
    return np.exp(-0.5 * ((pos - centre) / width) ** 2)


def budget_local_model(D: np.ndarray, perms: np.ndarray, low_share: float, alpha: float = 0.5,
                       width: float | None = None) -> QuadraticModel:
    """The quadratic model from marginals weighted toward the budget's state size (see the
    module doc); low_share = (B_hi - B) / (B_hi - B_lo), the share of layers left at 2 bits."""
    D = np.asarray(D, dtype=np.float64)
    if np.shape(perms) != D.shape:
        raise ValueError(f"perms has shape {np.shape(perms)}, expected {D.shape} like D")
    return quadratic_model(D, alpha=alpha, weights=budget_local_weights(perms, low_share, width))


def predicted_delta(model: QuadraticModel | tuple, q) -> float:
    """Delta(q) = a.q + q.K.q, the predicted loss increase of allocation q (1 = low precision);
    a model (a, K, f) with IMPQ-fit's size term adds f(sum q)."""
    a, K, *size = (model.a, model.K) if isinstance(model, QuadraticModel) else model
    q = np.asarray(q, dtype=np.float64)
    extra = float(np.asarray(size[0])[int(round(q.sum()))]) if size else 0.0
    return float(np.asarray(a) @ q + q @ np.asarray(K) @ q) + extra
