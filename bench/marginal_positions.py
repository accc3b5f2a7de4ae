"""Do a layer's marginals depend on how many layers are already at 2 bits? (an analysis of
a finished run, not a test; numpy only, no model)

SPQE lowers layers from 4 to 2 bits along random orders. A layer lowered early in an order
meets a model that is still almost all 4-bit; one lowered late meets a model that is
almost all 2-bit. The Shapley value averages over both. At a tight budget (2.25 bits:
a few layers kept at 4 bits) the choice is which layers to keep in an almost all-2-bit
model, so the late marginals are what matter. This prints, per third of the order, the
mean marginal and how its layer ranking agrees with the Shapley ranking.

    python bench/marginal_positions.py bench/results/smol-h100-hqq
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.runs import RunDir  # noqa: E402


def ranks(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--top", type=int, default=3, help="how many layers kept at 4 bits to list")
    args = parser.parse_args()
    records = RunDir(args.run_dir).samples()
    D = np.array([r["d"] for r in records], dtype=float)
    L = D.shape[1]
    thirds = {"early": (0, L // 3), "middle": (L // 3, 2 * L // 3), "late": (2 * L // 3, L)}
    sums = {k: np.zeros(L) for k in thirds}
    counts = {k: np.zeros(L) for k in thirds}
    for r in records:
        for position, layer in enumerate(r["perm"]):
            for k, (lo, hi) in thirds.items():
                if lo <= position < hi:
                    sums[k][layer] += r["d"][layer]
                    counts[k][layer] += 1
    phi = D.mean(axis=0)
    means = {k: sums[k] / np.maximum(counts[k], 1) for k in thirds}
    top = lambda v: sorted(int(i) for i in np.argsort(-v)[:args.top])  # noqa: E731
    report = {
        "run": args.run_dir, "samples": len(records), "layers": L,
        "v_high": records[0]["v_high"], "v_low": records[0]["v_low"],
        "thirds": {k: {"positions": list(thirds[k]), "mean_marginal": float(means[k].mean()),
                       "spearman_with_shapley": spearman(means[k], phi),
                       "fewest_observations": int(counts[k].min()), f"top{args.top}": top(means[k])}
                   for k in thirds},
        "spearman_early_late": spearman(means["early"], means["late"]),
        f"shapley_top{args.top}": top(phi),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
