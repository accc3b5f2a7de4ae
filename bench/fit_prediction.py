"""How well each allocation model predicts the loss of states it did not see (a benchmark).

For a finished run, the first `--train` samples fit each model and the walks of the
remaining samples are the test: every state a held-out walk visited, with its measured
v(S) - v({}), no new evaluation. Models: the paper's (a, K from Shapley estimates and
their covariance, alpha 0.5), IMPQ-local (the budget-local model at each state's share
of low layers) and IMPQ-fit (core.fit). Reports the RMSE over all held-out states and
the rank correlation (Spearman) among held-out states with the same number of low
layers, averaged over the sizes a budget of 2.25 to 2.5 bits decides among.

    python bench/fit_prediction.py bench/results/smol-h100-hqq bench/results/smol-h100-quanto \
        --out bench/results/fit_prediction.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.fit import fit_states, visited_states  # noqa: E402
from core.interactions import budget_local_model, quadratic_model  # noqa: E402
from core.runs import RunDir  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def quadratic(a, K, X) -> np.ndarray:
    return X @ a + np.einsum("ni,ij,nj->n", X, K, X)


def evaluate(run_dir: str, train: int, sizes: range) -> dict:
    run = RunDir.open(run_dir)
    D, P = run.D(), run.P()
    L = D.shape[1]
    X, y, _ = visited_states(D[train:], P[train:])
    n_low = X.sum(axis=1).astype(int)
    paper = quadratic_model(D[:train], paired=run.config.antithetic)
    predictions = {"paper": quadratic(paper.a, paper.K, X),
                   "impq-fit": fit_states(D[:train], P[:train]).predict(X)}
    local = np.zeros_like(y)
    for n in range(L + 1):
        model = budget_local_model(D[:train], P[:train], n / L)
        rows = n_low == n
        local[rows] = quadratic(model.a, model.K, X[rows])
    predictions["impq-local"] = local
    out = {"run": run_dir, "backend": run.config.backend, "group_size": run.config.group_size,
           "layers": L, "train_samples": train, "test_samples": len(D) - train,
           "test_states": len(y), "sizes": [sizes.start, sizes.stop - 1], "models": {}}
    for name, pred in predictions.items():
        rmse = float(np.sqrt(np.mean((pred - y) ** 2)))
        rho = [spearman(pred[n_low == n], y[n_low == n]) for n in sizes]
        out["models"][name] = {"rmse_nats": rmse, "rank_corr_within_size": float(np.mean(rho))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--sizes", type=int, nargs=2, default=[21, 28],
                        help="numbers of low layers to rank within (default 21 28: 2.25-2.5 bits of 30)")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = [evaluate(r, args.train, range(args.sizes[0], args.sizes[1] + 1)) for r in args.runs]
    for r in report:
        for name, m in r["models"].items():
            print(f"{r['backend']:7s} {name:11s} RMSE {m['rmse_nats']:.3f} nats, within-size "
                  f"rank correlation {m['rank_corr_within_size']:.3f}")
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
