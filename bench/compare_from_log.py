"""A comparison's IMPQ rows from its log, where the comparison was cut off after its
evaluations but before it saved them (issue 20: the seed-2 quanto run on the H200,
stopped by the device tool's time limit).

`compare` evaluates the distinct allocations of every method and budget in sorted order
and logs each as `evaluated allocation k/N: H layers at 4 bits, ppl P`, without the
method. The IMPQ, IMPQ-local and IMPQ-fit allocations depend only on the run's samples
and are solved again here (core.compare's own solvers); the baselines' allocations that
the log shows with the same perplexity as in another run's saved comparison (LIM, Z-score
and Activation, whose scores do not depend on the walks) are taken from it; the rest
(Sensitivity's, which depend on the calibration windows) are unknown. Every way of placing
the known allocations, in sorted order, on log lines with their number of 4-bit layers
(and, for baselines, their perplexity) is enumerated; each IMPQ row gets the perplexities
it has over all placements (one value where the log determines it), and its ratio to the
best baseline among the known ones (the unknown Sensitivity could only lower that best,
so a miss stays a miss).

    python bench/compare_from_log.py bench/results/quality-h200-fit-seed2/quanto \
        bench/results/quality-h200-fit-seed2/compare_log \
        --baselines-from bench/results/quality-h200-fit-seed1/compare_quanto.json \
        --out bench/results/quality-h200-fit-seed2/compare_from_log.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.compare import DEFAULT_BITS  # noqa: E402
from core.evaluate import IMPQ, IMPQ_FIT, IMPQ_LOCAL, solve_fit, solve_local  # noqa: E402
from core.fit import fit_states  # noqa: E402
from core.interactions import quadratic_model  # noqa: E402
from core.runs import RunDir, write_atomic  # noqa: E402
from core.solver import solve_impq  # noqa: E402

LINE = re.compile(r"evaluated allocation \d+/\d+: (\d+) layers at \d+ bits, ppl ([\d.]+)")
SHARED_BASELINES = ("lim", "zscore", "activation")


def placements(known: list[tuple], lines: list[tuple[int, float]], ppl_of: dict, top: int) -> list[list[int]]:
    """Every increasing assignment of the sorted known allocations to log lines that agrees
    with each one's number of top-level layers and, where known, its perplexity."""
    out: list[list[int]] = []

    def fits(t, line) -> bool:
        high, ppl = line
        return high == sum(x == top for x in t) and (t not in ppl_of or abs(ppl - ppl_of[t]) <= 1e-4 * ppl_of[t])

    def walk(i: int, j: int, path: list[int]) -> None:
        if j == len(known):
            out.append(path)
            return
        for k in range(i, len(lines) - (len(known) - j) + 1):
            if fits(known[j], lines[k]):
                walk(k + 1, j + 1, path + [k])

    walk(0, 0, [])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("log")
    p.add_argument("--baselines-from", required=True, help="another run's saved compare JSON, same model and backend")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    run = RunDir.open(args.run)
    D, P, costs = run.D(), run.P(), run.costs()
    top = costs.levels[-1]
    qmodel, fitted = quadratic_model(D, alpha=args.alpha, paired=run.config.antithetic), fit_states(D, P)
    known: dict[tuple[str, float], tuple] = {}
    for b in DEFAULT_BITS:
        known[(IMPQ, b)] = solve_impq(D, costs, bits=b, model=qmodel).bits_per_layer
        known[(IMPQ_LOCAL, b)] = solve_local(D, P, costs, bits=b, alpha=args.alpha).bits_per_layer
        known[(IMPQ_FIT, b)] = solve_fit(fitted, costs, bits=b).bits_per_layer
    ppl_of, baseline_ppl = {}, {}
    for r in json.loads(Path(args.baselines_from).read_text())["results"]:
        if r["method"] in SHARED_BASELINES or r["method"].startswith("uniform"):
            t = tuple(r["bits_per_layer"])
            known[(r["method"], r["target_bits"])] = t
            ppl_of[t] = r["ppl"]
            if r["method"] in SHARED_BASELINES:
                baseline_ppl.setdefault(r["target_bits"], {})[r["method"]] = r["ppl"]
    lines = [(int(m.group(1)), float(m.group(2))) for m in map(LINE.search, Path(args.log).read_text().splitlines()) if m]
    distinct = sorted(set(known.values()))
    found = placements(distinct, lines, ppl_of, top)
    if not found:
        sys.exit("no placement of the known allocations agrees with the log")
    rows = {}
    for (method, b), t in sorted(known.items()):
        if method not in (IMPQ, IMPQ_LOCAL, IMPQ_FIT):
            continue
        ppls = sorted({lines[f[distinct.index(t)]][1] for f in found})
        best = min(baseline_ppl[b].values())
        rows[f"{method} {b:g}"] = {"ppl": ppls, "ratio_to_best_known_baseline": [round(x / best, 3) for x in ppls],
                                   "best_known_baseline": min(baseline_ppl[b], key=baseline_ppl[b].get),
                                   "determined": len(ppls) == 1}
    report = {"what": __doc__.split("\n\n")[0].replace("\n", " "),
              "command": " ".join(["bench/compare_from_log.py"] + sys.argv[1:]),
              "log_lines": len(lines), "known_allocations": len(distinct), "placements": len(found),
              "unknown_lines": [[lines[k] for k in range(len(lines)) if k not in f] for f in found],
              "rows": rows}
    write_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    for name, r in rows.items():
        print(f"{name:18s} ppl {r['ppl']}  ratio {r['ratio_to_best_known_baseline']}")


if __name__ == "__main__":
    main()
