"""Time the 41-budget IMPQ frontier (core.solver.frontier: SCIP, GIL released, one thread
per core) on synthetic SPQE runs of 30 and 80 layers (a benchmark, not a test).

The game is quadratic: main effects and pairwise interactions of both signs; M walks of
it give the marginal vectors D, and the paper's model of D is solved at 2.00, 2.05, ...,
4.00 bits, with costs of a SmolLM2-like (30) or Llama-70B-like (80) layer mix. Writes JSON.
"linearized" is core.solver's pair of exact linearizations (one y per pair, Glover's one z
per drop): a model's first solve takes the first, its second tries the other, and later
solves take the one that has been faster.

    python bench/frontier_speed.py --out bench/results/frontier_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.interactions import quadratic_model  # noqa: E402
from core.solver import FRONTIER_GRID, Costs, frontier  # noqa: E402


def synthetic_D(L: int, M: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.05, 1.0, L)
    W = np.triu(rng.normal(0.0, 0.05, (L, L)), 1)
    W = W + W.T
    D = np.zeros((M, L))
    for m in range(M):
        x = np.zeros(L)
        for i in rng.permutation(L):
            before = x @ u + 0.5 * x @ W @ x
            x[i] = 1.0
            D[m, i] = x @ u + 0.5 * x @ W @ x - before + rng.normal(0, 0.02)
    return D


def costs(L: int) -> Costs:
    params = [int(4096 * 4096 * (1 + (i % 3))) for i in range(L)]
    return Costs(m_lo=[p // 4 + p // 64 for p in params], m_hi=[p // 2 + p // 64 for p in params],
                 params=params)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[30, 80])
    parser.add_argument("--samples", type=int, nargs="+", default=[3, 20, 100])
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for L in args.layers:
        for M in args.samples:
            model = quadratic_model(synthetic_D(L, M))
            start = time.perf_counter()
            allocs = frontier(model.a, model.K, costs(L), FRONTIER_GRID, factor=model.factor)
            seconds = time.perf_counter() - start
            rows.append({"layers": L, "samples": M, "budgets": len(allocs), "seconds": seconds,
                         "slowest_solve_s": max(a.seconds for a in allocs),
                         "form": "compact" if M - 1 < L else "linearized",
                         "all_optimal": all(a.status in ("optimal", "all-high") for a in allocs)})
            print(f"{L} layers, {M} samples: {seconds:.2f} s for {len(allocs)} budgets "
                  f"({rows[-1]['form']}, slowest solve {rows[-1]['slowest_solve_s']:.2f} s)", flush=True)
    report = {"cpu_threads": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
