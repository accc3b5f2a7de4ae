"""Real loss of early-stopped allocations (issue 17; GPU): what stopping costs in
perplexity on held-out text, not only in predicted loss.

Input: bench/results/early_stop_stops.json, written by bench/early_stop.py: for each
real SPQE run and each (K, tol) setting of the settle rule, every re-ordering's
stopped allocations at 2.5/3.0/3.5 bits, and the full run's own allocations. Each run's
model is loaded once (core.compare's loader: the run's dtype, the real backend's
modules), every distinct allocation is evaluated by swapping module references on the
evaluation tokens that eval and compare use (disjoint from the calibration text), in
lexicographic order so consecutive evaluations share a prefix. Reported per setting and
budget: the perplexity ratio stopped / full run (mean, worst, share worse by more than
1%), and the mean samples to stop; the same for the baseline of a fixed number of samples.
Writes one JSON object.

    python bench/early_stop_real.py --device cuda --out bench/results/early_stop_real.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from core.switching import PrefixEvaluator  # noqa: E402
from eval_allocations import device_name, evaluate_all, open_run, write_report  # noqa: E402


def measure(path: str, entry: dict, bits: list[float], device: str, windows, log) -> dict:
    run, loaded, tokens, real = open_run(path, device, windows, log)
    evaluator = PrefixEvaluator(loaded, tokens, max(1, run.config.micro_batch))
    wanted = {tuple(a) for a in entry["full"]}
    for setting in entry["settings"] + entry.get("fixed", []):
        for stop in setting["stops"]:
            wanted |= {tuple(a) for a in stop["allocations"]}
    t = time.perf_counter()
    nll = {a: row["eval"] for a, row in evaluate_all(real, {"eval": evaluator}, wanted).items()}
    log(f"{path}: {len(wanted)} allocations in {time.perf_counter() - t:.1f}s")
    full = [nll[tuple(a)] for a in entry["full"]]

    def budgets(stops: list[dict]) -> list[dict]:
        per_budget = []
        for j, b in enumerate(bits):
            ratio = np.array([math.exp(nll[tuple(s["allocations"][j])] - full[j]) for s in stops])
            per_budget.append({"bits": b, "ppl_ratio_mean": float(ratio.mean()),
                               "ppl_ratio_max": float(ratio.max()),
                               "ppl_ratio_min": float(ratio.min()),
                               "worse_by_1pct_share": float((ratio > 1.01).mean())})
        return per_budget

    rows = [{"K": setting["K"], "tol": setting["tol"],
             "stop_mean": float(np.mean([s["m"] for s in setting["stops"]])),
             "budgets": budgets(setting["stops"])} for setting in entry["settings"]]
    fixed = [{"m": setting["m"], "budgets": budgets(setting["stops"])}
             for setting in entry.get("fixed", [])]
    return {"samples": len(run.D()), "full_ppl": [math.exp(x) for x in full],
            "eval_tokens": int(evaluator.predicted), "allocations_evaluated": len(wanted),
            "settings": rows, "fixed": fixed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stops", default=str(ROOT / "bench/results/early_stop_stops.json"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=str(ROOT / "bench/results/early_stop_real.json"))
    p.add_argument("--windows", type=int, help="evaluation windows (default: eval's)")
    p.add_argument("--runs", nargs="+", help="only these runs of the stops file")
    args = p.parse_args()
    stops = json.loads(Path(args.stops).read_text())
    report = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "bits": stops["bits"],
              "orderings": stops["orderings"], "device": device_name(),
              "command": " ".join(["bench/early_stop_real.py"] + sys.argv[1:]), "runs": {}}
    runs = {path: entry for path, entry in stops["runs"].items() if not args.runs or path in args.runs}
    write_report(report, runs, lambda path, entry, log: measure(
        path, entry, stops["bits"], args.device, args.windows, log), args.out)


if __name__ == "__main__":
    main()
