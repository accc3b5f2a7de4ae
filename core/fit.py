"""IMPQ-fit, our extension (METHOD.md): a quadratic pseudo-Boolean model fitted to the
states SPQE's walks visited, instead of one built from the marginals' covariance.

Sample m walks S_0 = {} -> S_1 -> ... -> S_L (all low), lowering layer p_k at step k, and
measures v(S_k) - v({}) = d_m[p_1] + ... + d_m[p_k] at every state on the way: L + 1
states a sample, no evaluation beyond SPQE's own. With x_i = 1 when layer i is low,

    v(S) - v({}) ~ u.x + sum_{i<j} w_ij x_i x_j

is fitted to all of them by least squares with a ridge penalty lam on the pairwise terms
w (the main effects u are identified by every walk and stay unpenalized). lam is chosen
by cross-validation over held-out walks: whole samples are left out, never single
states of a walk, and only calibration losses are used. The fitted model goes into the
same SCIP program as the paper's (a = u, K = W / 2 so that q.K.q counts each pair once),
under the same byte budget. Unlike Cov(d_i, d_j), which is -w_ij^2 / 4 for a purely
pairwise loss whatever the sign of w_ij, w keeps the sign of every interaction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import UserError

LAMBDAS = tuple(10.0 ** k for k in range(-6, 5))   # relative to the mean diagonal of X'X
MAX_FOLDS = 5


@dataclass(frozen=True)
class FittedModel:
    u: np.ndarray        # [L] main effects: the loss increase of layer i alone at low precision
    W: np.ndarray        # [L, L] symmetric, zero diagonal: w_ij, the pair's interaction
    lam: float           # the ridge penalty cross-validation chose (absolute)
    cv_rmse: float       # its held-out RMSE over left-out walks (nats)
    samples: int         # walks fitted
    states: int          # states fitted (samples x (L + 1))

    @property
    def a(self) -> np.ndarray:
        return self.u

    @property
    def K(self) -> np.ndarray:
        return self.W / 2

    def predict(self, X: np.ndarray) -> np.ndarray:
        """v(S) - v({}) for states X [n, L] of 0/1 (1 = low precision)."""
        X = np.asarray(X, dtype=np.float64)
        return X @ self.u + 0.5 * np.einsum("ni,ij,nj->n", X, self.W, X)


def visited_states(D: np.ndarray, perms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every state the walks visited: X [M (L + 1), L] of 0/1, y = v(S) - v({}) and the
    walk each state belongs to."""
    D, perms = np.asarray(D, dtype=np.float64), np.asarray(perms)
    if D.shape != perms.shape or D.ndim != 2:
        raise ValueError(f"D {D.shape} and perms {perms.shape} must both be [M, L]")
    M, L = D.shape
    X = np.zeros((M, L + 1, L))
    y = np.zeros((M, L + 1))
    for m in range(M):
        steps = D[m, perms[m]]                      # marginals in walk order
        y[m, 1:] = np.cumsum(steps)
        for k in range(1, L + 1):
            X[m, k] = X[m, k - 1]
            X[m, k, perms[m, k - 1]] = 1.0
    return X.reshape(-1, L), y.reshape(-1), np.repeat(np.arange(M), L + 1)


def _features(X: np.ndarray) -> np.ndarray:
    """[n, L + L(L-1)/2]: x_i, then x_i x_j for i < j."""
    i, j = np.triu_indices(X.shape[1], k=1)
    return np.concatenate([X, X[:, i] * X[:, j]], axis=1)


def _ridge(G: np.ndarray, b: np.ndarray, L: int, lam: float) -> np.ndarray:
    """argmin |F beta - y|^2 + lam |w|^2, from G = F'F and b = F'y."""
    penalty = np.full(G.shape[0], lam)
    penalty[:L] = lam * 1e-9          # main effects: numerically unpenalized
    return np.linalg.solve(G + np.diag(penalty), b)


def fit_states(D: np.ndarray, perms: np.ndarray, *, lambdas=LAMBDAS, seed: int = 0) -> FittedModel:
    """IMPQ-fit's model of a run's samples (see the module doc)."""
    D = np.asarray(D, dtype=np.float64)
    M = D.shape[0] if D.ndim == 2 else 0
    if M < 2:
        raise UserError(f"IMPQ-fit needs at least 2 SPQE samples to choose its regularization on "
                        f"held-out walks; the run has {M}. Continue the run, or use IMPQ.")
    L = D.shape[1]
    X, y, walk = visited_states(D, perms)
    F = _features(X)
    G, b = F.T @ F, F.T @ y
    scale = float(np.mean(np.diag(G)))
    folds = np.random.default_rng(seed).permutation(M) % min(MAX_FOLDS, M)
    sq_errors = np.zeros(len(lambdas))
    for f in range(folds.max() + 1):
        held = np.isin(walk, np.flatnonzero(folds == f))
        F_h, y_h = F[held], y[held]
        G_t, b_t = G - F_h.T @ F_h, b - F_h.T @ y_h     # the other walks' normal equations
        for k, rel in enumerate(lambdas):
            beta = _ridge(G_t, b_t, L, rel * scale)
            sq_errors[k] += float(np.sum((F_h @ beta - y_h) ** 2))
    errors = np.sqrt(sq_errors / len(y))
    best = int(np.argmin(errors))
    lam = lambdas[best] * scale
    beta = _ridge(G, b, L, lam)
    W = np.zeros((L, L))
    i, j = np.triu_indices(L, k=1)
    W[i, j] = W[j, i] = beta[L:]
    return FittedModel(u=beta[:L], W=W, lam=lam, cv_rmse=float(errors[best]), samples=M,
                       states=len(y))
