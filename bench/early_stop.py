"""Choosing core.settle's defaults by measurement (issue 17, early stop).

Input: real SPQE runs of the embedded SmolLM2-135M-Instruct (H100, bfloat16, 16 x 2048
calibration tokens): bench/results/smol-h100-hqq (100 samples) and -quanto (96).
SPQE samples are i.i.d. draws (a uniformly random permutation each), so a random
re-ordering of a run's samples is a stream another seed could have produced; each
re-ordering here stands for one seed. They are not independent seeds: every ordering
draws from the same 100 samples, and all of them end at the same full-run allocation,
which is itself an estimate. What this measures is how far a stopped run is from the
run that went to its maximum.

For each ordering, the state (core.settle.state: the IMPQ allocation at 2.5/3.0/3.5 bits
and the largest se/|phi| of the marginal drops) is computed after every sample once;
every (K, rse, min_samples) of the grid is then applied to those trajectories. Reported
per setting: samples-to-stop (mean, percentiles, how often the maximum was reached),
how often the stopped allocation differs from the full-run one at each budget, how many
layers differ, and the predicted loss gap under the full-run model (Delta of the stopped
allocation minus Delta of the full-run one, nats/token; >= 0 up to the solver's
tolerance). The baseline a rule must beat: stopping every ordering after a fixed number
of samples (FIXED_M), reported the same way. Real (measured) loss gaps need the GPU:
bench/early_stop_real.py evaluates the stopped allocations this writes.

    .venv/bin/python bench/early_stop.py                    # writes bench/results/early_stop.json
    .venv/bin/python bench/early_stop.py --orderings 8 --out /tmp/es.json   # quick look
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np

from core.interactions import predicted_delta, quadratic_model
from core.runs import RunDir, write_atomic
from core.settle import DEFAULT_BITS, SettleRule, State, settled, state
from core.solver import solve_impq

RUNS = ("bench/results/smol-h100-hqq", "bench/results/smol-h100-quanto")
GRID_K = (3, 5, 8, 10, 15, 20)
GRID_RSE = (math.inf, 1.0, 0.5, 0.3)
GRID_MIN = (10, 20)
GRID_TOL = (0.0, 0.005, 0.01, 0.02, 0.05)
K_MAX = max(GRID_K)
FIXED_M = (20, 30, 35, 40, 45, 50, 60, 75)   # the baseline: stop after a fixed number of samples
WHY = ("Measured in predicted loss here and in real perplexity by bench/early_stop_real.py "
       "(bench/results/early_stop_real.json). The IMPQ allocation of SmolLM2-135M keeps swapping "
       "a layer or two near the cut up to ~100 samples, and each swap moves the real perplexity "
       "a lot (these budgets are near collapse), so every way of stopping early costs real loss "
       "in proportion to the samples it saves: K=10 stops at 79 (hqq) and 82 (quanto) of 100/96 "
       "samples on average, at mean perplexity ratios to the full run of at most 1.09 (hqq, 3.5 "
       "bits); K=5 at 52-54 costs up to 1.32; a tolerance on the predicted regret (tol 2-5%) "
       "stops at 34-46 but costs 1.18-1.48 at 3.0-3.5 bits, no better than stopping after the "
       "same fixed number of samples. So K=10 with tol 0 stays the default. rse binds only below "
       "0.5 (0.5 kept as a guard against fluke early stops), min_samples not at all past K=8 (20 "
       "kept for very stable models).")
FIRST_M = 1          # states from the first sample on, as the engine computes them


def trajectory(path: str, seed: int, bits) -> list[dict]:
    run = RunDir.open(path)
    D, costs = run.D(), run.costs()
    rng = np.random.default_rng(seed)
    if run.config.antithetic:   # re-order whole antithetic pairs (a permutation and its reverse)
        pairs = rng.permutation(len(D) // 2)
        order = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
    else:
        order = rng.permutation(len(D))
    Dp = D[order]
    out, previous = [], []
    for m in range(FIRST_M, len(Dp) + 1):
        s = state(Dp[:m], costs, bits, run.config.antithetic, previous=previous[::-1])
        out.append({"m": s.m, "allocations": [list(a) for a in s.allocations], "rse": s.rse,
                    "regret": list(s.regret)})
        previous = (previous + [s.allocations])[-K_MAX:]
    return out


def stop_of(traj: list[dict], rule: SettleRule) -> dict:
    history = []
    for t in traj:
        history.append(State(m=t["m"], allocations=tuple(map(tuple, t["allocations"])), rse=t["rse"],
                             regret=tuple(t["regret"])))
        if settled(history, rule):
            return t
    return traj[-1]       # the hard maximum: every sample


def summarize(path: str, trajs: list[list[dict]], bits) -> list[dict]:
    run = RunDir.open(path)
    D, costs = run.D(), run.costs()
    full_model = quadratic_model(D, paired=run.config.antithetic)
    full = [solve_impq(D, costs, bits=b, model=full_model) for b in bits]
    M = len(D)
    rows, kept = [], []

    def budgets(stops: list[dict]) -> list[dict]:
        per_budget = []
        for j, (b, ref) in enumerate(zip(bits, full)):
            layers = np.array([sum(x != y for x, y in zip(s["allocations"][j], ref.bits_per_layer))
                               for s in stops])
            gaps = np.array([predicted_delta(full_model, costs.drops_of(s["allocations"][j]))
                             - ref.predicted_delta_nll for s in stops])
            per_budget.append({
                "bits": b, "differs_share": float((layers > 0).mean()),
                "layers_differ_mean": float(layers.mean()), "layers_differ_max": int(layers.max()),
                "predicted_gap_mean": float(gaps.mean()), "predicted_gap_max": float(gaps.max()),
                "predicted_gap_rel_mean": float(gaps.mean() / ref.predicted_delta_nll),
                "predicted_gap_rel_max": float(gaps.max() / ref.predicted_delta_nll),
                "full_predicted_delta": ref.predicted_delta_nll})
        return per_budget

    for K, rse, mins, tol in itertools.product(GRID_K, GRID_RSE, GRID_MIN, GRID_TOL):
        rule = SettleRule(bits=tuple(bits), K=K, rse=rse, min_samples=mins, tol=tol)
        stops = [stop_of(t, rule) for t in trajs]
        if rse == SettleRule.rse and mins == SettleRule.min_samples:
            kept.append({"K": K, "tol": tol, "stops": [{"m": s["m"], "allocations": s["allocations"]}
                                                       for s in stops]})
        ms = np.array([s["m"] for s in stops])
        per_budget = budgets(stops)
        rows.append({
            "K": K, "rse": None if math.isinf(rse) else rse, "min_samples": mins, "tol": tol,
            "stop_mean": float(ms.mean()), "stop_p10": float(np.percentile(ms, 10)),
            "stop_p50": float(np.percentile(ms, 50)), "stop_p90": float(np.percentile(ms, 90)),
            "stop_max": int(ms.max()), "reached_max_share": float((ms == M).mean()),
            "any_differs_share": float(np.mean([any(s["allocations"][j] != list(r.bits_per_layer)
                                                    for j, r in enumerate(full)) for s in stops])),
            "budgets": per_budget})
    fixed, fixed_kept = [], []
    for m in (m for m in FIXED_M if m < M):
        stops = [t[m - FIRST_M] for t in trajs]
        fixed.append({"m": m, "budgets": budgets(stops)})
        fixed_kept.append({"m": m, "stops": [{"m": m, "allocations": s["allocations"]} for s in stops]})
    full_allocations = [list(r.bits_per_layer) for r in full]
    return rows, fixed, {"full": full_allocations, "settings": kept, "fixed": fixed_kept}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", default=list(RUNS))
    p.add_argument("--orderings", type=int, default=40, help="re-orderings (emulated seeds) per run")
    p.add_argument("--bits", type=float, nargs="+", default=list(DEFAULT_BITS))
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default=str(ROOT / "bench/results/early_stop.json"))
    p.add_argument("--stops-out", default=str(ROOT / "bench/results/early_stop_stops.json"),
                   help="every ordering's stopped allocations (K x tol at the default rse and "
                        "minimum), the input of bench/early_stop_real.py (GPU)")
    args = p.parse_args()
    t0 = time.perf_counter()
    report = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "bits": args.bits,
              "orderings": args.orderings, "machine": platform.processor() or platform.machine(),
              "command": " ".join(["bench/early_stop.py"] + sys.argv[1:]), "runs": {}}
    stops = {"bits": args.bits, "orderings": args.orderings, "runs": {}}
    with ProcessPoolExecutor(args.workers) as pool:
        for path in args.runs:
            futures = [pool.submit(trajectory, path, seed, tuple(args.bits)) for seed in range(args.orderings)]
            trajs = [f.result() for f in futures]
            M = len(RunDir.open(path).D())
            rses = np.array([[t["rse"] for t in tr] for tr in trajs])
            rows, fixed, stops["runs"][path] = summarize(path, trajs, args.bits)
            report["runs"][path] = {
                "samples": M,
                "rse_by_m": {str(m): float(np.median(rses[:, m - FIRST_M]))
                             for m in (5, 10, 20, 30, 50, 75, M) if FIRST_M <= m <= M},
                "settings": rows, "fixed": fixed}
            print(f"{path}: {args.orderings} orderings in {time.perf_counter() - t0:.0f}s", flush=True)
    report["defaults"] = {**dataclasses.asdict(SettleRule()), "why": WHY}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    write_atomic(Path(args.stops_out), json.dumps(stops) + "\n")
    print(f"wrote {args.out} and {args.stops_out}")


if __name__ == "__main__":
    main()
