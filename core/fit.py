"""IMPQ-fit, our extension (METHOD.md): a quadratic pseudo-Boolean model fitted to the
states SPQE's walks visited, instead of one built from the marginals' covariance.

Sample m walks S_0 = {} -> S_1 -> ... -> S_L (all low), lowering layer p_k at step k, and
measures v(S_k) - v({}) = d_m[p_1] + ... + d_m[p_k] at every state on the way: L + 1
states a sample, no evaluation beyond SPQE's own. With x_i = 1 when layer i is low and
n = sum_i x_i the number of low layers,

    v(S) - v({}) ~ u.x + sum_{i<j} w_ij x_i x_j + f(n),      f(0) = f(1) = f(2) = 0,

is fitted to all of them by least squares with a ridge penalty lam on the pairwise terms
w (the main effects u and the size term f are identified by every walk and stay
unpenalized). lam is chosen by cross-validation over held-out walks: whole samples are
left out, never single states of a walk, and only calibration losses are used.

The size term f is a free function of the number of low layers: the loss saturates as
layers go low (a model near collapse loses little more from its last layers), a trend
along n that pairwise terms alone can only mimic by bending every w_ij, at the cost of
ranking the states of one size, which are the states a budget decides among. With f, w
keeps to the interactions. It was kept by measurement on real losses of the allocations
it chooses (README's Quality section, bench/fit_real.py): with quanto it cost 0.13 nats
less than the quadratic alone on average, with HQQ 0.02 more (within noise).

The fitted model goes into the same SCIP program as the paper's (a = u, K = W / 2 so that
q.K.q counts each pair once), under the same byte budget, with f as one binary per
number of low layers (core.solver.solve's `size`), among allocations that spend the
budget (core.solver.solve_fit says why). Unlike Cov(d_i, d_j), which is
-w_ij^2 / 4 for a purely pairwise loss whatever the sign of w_ij, w keeps the sign of
every interaction. With more levels the variables are drops, and n counts drops.
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
    f: np.ndarray | None = None   # [L + 1] the size term f(n), f(0) = f(1) = f(2) = 0; None: zeros

    def __post_init__(self):
        f = np.zeros(len(self.u) + 1) if self.f is None else np.asarray(self.f, dtype=np.float64)
        if f.shape != (len(self.u) + 1,):
            raise ValueError(f"f has shape {f.shape}, expected ({len(self.u) + 1},)")
        object.__setattr__(self, "f", f)

    @property
    def a(self) -> np.ndarray:
        return self.u

    @property
    def K(self) -> np.ndarray:
        return self.W / 2

    def predict(self, X: np.ndarray) -> np.ndarray:
        """v(S) - v({}) for states X [n, L] of 0/1 (1 = low precision)."""
        X = np.asarray(X, dtype=np.float64)
        n = np.rint(X.sum(axis=1)).astype(int)
        return X @ self.u + 0.5 * np.einsum("ni,ij,nj->n", X, self.W, X) + self.f[n]


def walk_losses(D: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """[M, L + 1]: v(S_k) - v({}) at every step k of every walk (k low layers, or drops)."""
    D, perms = np.asarray(D, dtype=np.float64), np.asarray(perms)
    if D.shape != perms.shape or D.ndim != 2:
        raise ValueError(f"D {D.shape} and perms {perms.shape} must both be [M, L]")
    y = np.zeros((D.shape[0], D.shape[1] + 1))
    y[:, 1:] = np.cumsum(np.take_along_axis(D, perms, axis=1), axis=1)   # marginals in walk order
    return y


def visited_states(D: np.ndarray, perms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every state the walks visited: X [M (L + 1), L] of 0/1, y = v(S) - v({}) and the
    walk each state belongs to."""
    y = walk_losses(D, perms)
    perms = np.asarray(perms)
    M, L = perms.shape
    X = np.zeros((M, L + 1, L))
    for m in range(M):
        for k in range(1, L + 1):
            X[m, k] = X[m, k - 1]
            X[m, k, perms[m, k - 1]] = 1.0
    return X.reshape(-1, L), y.reshape(-1), np.repeat(np.arange(M), L + 1)


def _features(X: np.ndarray) -> np.ndarray:
    """[n, L + L(L-1)/2 + L - 1]: x_i, then x_i x_j for i < j, then the size term's
    indicators [n == 2], ..., [n == L] (f(0) = f(1) = 0 leaves u identified)."""
    L = X.shape[1]
    i, j = np.triu_indices(L, k=1)
    n = np.rint(X.sum(axis=1)).astype(int)
    sizes = (n[:, None] == np.arange(2, L + 1)[None, :]).astype(np.float64)
    return np.concatenate([X, X[:, i] * X[:, j], sizes], axis=1)


def _ridge(G: np.ndarray, b: np.ndarray, L: int, lam: float) -> np.ndarray:
    """argmin |F beta - y|^2 + lam |w|^2, from G = F'F and b = F'y."""
    penalty = np.full(G.shape[0], lam * 1e-9)    # main effects and size term: numerically unpenalized
    penalty[L:L + L * (L - 1) // 2] = lam
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
    W[i, j] = W[j, i] = beta[L:L + len(i)]
    f = np.zeros(L + 1)
    f[2:] = beta[L + len(i):]
    # A common shift c of every w_ij adds c n(n-1)/2, which f can take back: the ridge
    # penalty picked the W of least norm. Moving f(2) into W (the same predictions) makes
    # w_ij the pair's interaction as the states of two low layers measure it, f(2) = 0.
    if L >= 2:
        n = np.arange(L + 1)
        c, f = f[2], f - f[2] * n * (n - 1) / 2
        W[i, j] += c
        W[j, i] += c
    return FittedModel(u=beta[:L], W=W, lam=lam, cv_rmse=float(errors[best]), samples=M,
                       states=len(y), f=f)
