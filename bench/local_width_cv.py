"""How well does each quadratic model rank held-out calibration states? (IMPQ-local's width)

Every SPQE walk measures v(S) for L + 1 states S. This script holds out a fifth of the
samples, fits the paper's model (Shapley phi and K) and the budget-local model at several
widths on the rest, and asks each to rank the held-out states near the size a budget
implies (within one layer of round(low_share * L) layers at 2 bits): the Spearman
correlation between the predicted Delta(q) and the measured v(S) - v(all 4-bit). This
uses calibration data only, never the evaluation text, so choosing the width from it
does not tune to the reported perplexity.

    python bench/local_width_cv.py bench/results/smol-h100-hqq bench/results/smol-h100-quanto \
        --out bench/results/local_width_cv.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from core.interactions import budget_local_model, predicted_delta, quadratic_model  # noqa: E402
from core.runs import RunDir  # noqa: E402
from core.solver import budget_bytes, low_share  # noqa: E402


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def spearman(a, b) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def held_out_states(P, D, v_high, rows, size, reach=1):
    """(q, v(S) - v_high) of the walk states of `rows` within `reach` of `size` low layers."""
    L = P.shape[1]
    out = []
    for m in rows:
        q, v = np.zeros(L), 0.0
        for k, layer in enumerate(P[m], 1):
            q = q.copy()
            q[layer], v = 1.0, v + D[m, layer]
            if abs(k - size) <= reach:
                out.append((q, v))
    return out


def study(run_dir: str, bits, widths, folds: int, repeats: int, seed: int) -> dict:
    run = RunDir.open(run_dir)
    D, P, costs = run.D(), run.P(), run.costs()
    v_high = run.finite_samples()[0]["v_high"]
    M, L = D.shape
    rng = np.random.default_rng(seed)
    result = {"run": run_dir, "samples": M, "layers": L, "budgets": {}}
    for b in bits:
        share = low_share(costs, budget_bytes(costs, b))
        size = round(share * L)
        scores: dict[str, list[float]] = {}
        for _ in range(repeats):
            order = rng.permutation(M)
            for f in range(folds):
                test = order[f::folds]
                train = np.setdiff1d(order, test)
                states = held_out_states(P, D, v_high, test, size)
                y = [v for _, v in states]
                models = {"shapley (paper)": quadratic_model(D[train])}
                for w in widths:
                    models[f"local, width {w:g}"] = budget_local_model(D[train], P[train], share, width=w)
                models[f"local, width L/8 = {L / 8:g}"] = budget_local_model(D[train], P[train], share)
                for name, model in models.items():
                    pred = [predicted_delta(model, q) for q, _ in states]
                    scores.setdefault(name, []).append(spearman(pred, y))
        result["budgets"][str(b)] = {
            "low_layers": size,
            "spearman_mean": {k: float(np.mean(v)) for k, v in scores.items()},
            "spearman_se": {k: float(np.std(v) / np.sqrt(len(v))) for k, v in scores.items()}}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--bits", type=float, nargs="+", default=[2.25, 2.5, 3.0, 3.5])
    p.add_argument("--widths", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    report = {"command": "python bench/local_width_cv.py " + " ".join(argv or sys.argv[1:]),
              "studies": [study(r, args.bits, args.widths, args.folds, args.repeats, args.seed)
                          for r in args.runs]}
    for s in report["studies"]:
        print(f"{s['run']} ({s['samples']} samples, {s['layers']} layers): held-out Spearman")
        for b, r in s["budgets"].items():
            cells = ", ".join(f"{k} {v:.2f}" for k, v in r["spearman_mean"].items())
            print(f"  {b} bits (~{r['low_layers']} layers at 2 bits): {cells}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
