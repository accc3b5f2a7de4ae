"""Control variates for SPQE's Shapley estimates, measured offline on real runs (issue 17:
variance reduction is kept only where it lowers the samples needed; this measures the
first step, how much it lowers the variance of each layer's estimate).

IMPQ-fit's model (core.fit) predicts every marginal a walk measures: layer i lowered at
step k of sample m, with the layers S already low, has g_mi = u_i + sum_{j in S} w_ij +
f(k) - f(k-1). Over uniformly random walks its mean is known exactly, E_i = u_i +
(1/2) sum_j w_ij + f(L) / L (the position is uniform and, given it, S is a uniform subset
of the others). So phi_i = mean_m (d_mi - g_mi) + E_i estimates the same Shapley value as
mean_m d_mi, unbiased when the model is fitted on other samples (cross-fitting: 5 folds
of whole samples, each predicted by the fit of the other four), with variance
var(d_i - g_i) / M instead of var(d_i) / M. Reported per run: the median over layers of
var(d - g) / var(d) (the share of samples the same standard error needs), the median
se/|phi| of both estimators at all samples, how far the two estimates lie apart, and
1 - corr(d_i, g_i)^2, the ratio a per-layer coefficient on g fitted in hindsight would
reach (a bound on what tuning the control variate could add).

    python bench/control_variates.py bench/results/smol-h100-hqq bench/results/smol-h100-quanto \
        --out bench/results/control_variates.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.fit import fit_states  # noqa: E402
from core.runs import RunDir, write_atomic  # noqa: E402

FOLDS = 5


def predicted_marginals(model, perms: np.ndarray) -> np.ndarray:
    """g [M, L]: the model's marginal of each layer in each walk (indexed by layer)."""
    M, L = perms.shape
    g = np.zeros((M, L))
    for m in range(M):
        low = np.zeros(L, dtype=bool)
        for k, i in enumerate(perms[m], 1):
            g[m, i] = model.u[i] + model.W[i, low].sum() + model.f[k] - model.f[k - 1]
            low[i] = True
    return g


def shapley_of(model) -> np.ndarray:
    L = len(model.u)
    return model.u + 0.5 * model.W.sum(axis=1) + model.f[L] / L


def measure(path: str, seed: int = 0) -> dict:
    run = RunDir.open(path)
    D, P = run.D(), np.asarray(run.P())
    M, L = D.shape
    folds = np.random.default_rng(seed).permutation(M) % FOLDS
    resid, g = np.zeros_like(D), np.zeros_like(D)
    for f in range(FOLDS):
        held, train = folds == f, folds != f
        model = fit_states(D[train], P[train])
        g[held] = predicted_marginals(model, P[held])
        resid[held] = D[held] - g[held] + shapley_of(model)
    phi, phi_cv = D.mean(axis=0), resid.mean(axis=0)
    var, var_cv = D.var(axis=0, ddof=1), resid.var(axis=0, ddof=1)
    ratio = var_cv / var
    corr = np.array([np.corrcoef(D[:, i], g[:, i])[0, 1] for i in range(L)])
    rse = np.sqrt(var / M) / np.abs(phi)
    rse_cv = np.sqrt(var_cv / M) / np.abs(phi_cv)
    return {"samples": M, "layers": L,
            "variance_ratio_median": float(np.median(ratio)),
            "variance_ratio_p10_p90": [float(np.percentile(ratio, 10)), float(np.percentile(ratio, 90))],
            "variance_ratio_best_coefficient_median": float(np.median(1 - corr ** 2)),
            "se_over_phi_median": float(np.median(rse)), "se_over_phi_median_cv": float(np.median(rse_cv)),
            "estimates_apart_in_se_median": float(np.median(np.abs(phi - phi_cv) / np.sqrt(var / M))),
            "rank_correlation_phi": float(np.corrcoef(np.argsort(np.argsort(phi)),
                                                      np.argsort(np.argsort(phi_cv)))[0, 1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    report = {"what": __doc__.split("\n\n")[1].replace("\n", " "),
              "command": " ".join(["bench/control_variates.py"] + sys.argv[1:]),
              "runs": {path: measure(path) for path in args.runs}}
    write_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["runs"], indent=1))


if __name__ == "__main__":
    main()
