"""Checked choices (issue 20): measure a few candidate allocations of a budget on the run's
calibration windows and keep the one with the lowest loss.

IMPQ-fit's misses are at the tight budgets, where its one allocation is the optimum of a
model that is wrong by more than the differences it ranks (the optimizer's curse). Among
the allocations of one budget, calibration and evaluation losses rank alike (Spearman
0.95-0.995, bench/fit_real.py), so a candidate measured on the calibration windows is
judged almost as the evaluation text would judge it. This study asks which candidates are
worth measuring. Per run and budget, the pool (every candidate computed from the run's
samples alone, labelled by family; core.checked.candidates, the pool IMPQ-fit, checked
ships, which this script first wrote and measured in this form):
  impq, local, fit      the paper's IMPQ, IMPQ-local and IMPQ-fit (core.solver);
  fit-next1..5          IMPQ-fit's next best allocations (each earlier one cut off);
  fit-h1, fit-h2        IMPQ-fit fitted on either half of the walks;
  visited1..5           the states the walks visited that spend the budget, lowest
                        measured loss first (their calibration loss is known already);
  swap1..5              the fit's best one-swap neighbour of each of them (one layer up,
                        another down, still spending the budget);
  baseline:<m>          the four baselines (added on the GPU, as compare computes them), so
                        that every ratio has its denominator from the same evaluation.

  candidates  the pools, on the CPU (SCIP), to JSON
  measure     on the GPU: each run loaded as compare loads it, the baselines' scores and
              allocations, every distinct allocation's mean NLL on the calibration
              windows and on both halves of the evaluation text; one JSON per run
              (written as each run finishes)
  descent     on the GPU: IMPQ-fit, checked as shipped (core.checked.choose, its measured
              descent included, on the shipped judge windows) per run and budget; the
              candidates' choice, the descent's, IMPQ-fit's and the baselines' allocations
              on the evaluation text with their ratios; one JSON per run
  report      per run and budget: each single method's perplexity over the best
              baseline's, and that of the candidate with the lowest calibration loss
              within each sub-pool; whether the walks' losses are the measured ones

    python bench/checked.py candidates --out bench/results/checked_candidates.json
    python bench/checked.py measure bench/results/checked_candidates.json --device cuda --out DIR
    python bench/checked.py report bench/results/checked_candidates.json \
        bench/results/checked-h200/*.json --out bench/results/checked.json
    python bench/checked.py measure bench/results/checked_candidates.json --device cuda \
        --windows 16 --only <the 4- and 8-window runs> --out bench/results/checked-h200/judge16
    python bench/checked.py report bench/results/checked_candidates.json --key judge \
        bench/results/checked-h200/{judge16/*,quality*,smol-h100*}.json --out bench/results/checked_judge16.json

    python bench/checked.py descent --device cuda --out bench/results/checked-h200/descent

(bench/results/checked-h200/: the 8 runs' measurements on one H200, 2 calls of `measure
--only`; compare/: the shipped `compare` with its IMPQ-fit, checked rows on the GPTQ and
GGUF runs; descent/: `descent` in three calls, and compare/ within it the shipped `compare`
with the descent.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from eval_allocations import key  # noqa: E402

from core.checked import candidates as candidates_of  # noqa: E402
from core.fit import visited_states  # noqa: E402
from core.interactions import quadratic_model  # noqa: E402
from core.runs import RunDir, write_atomic  # noqa: E402

RUNS = ("bench/results/quality-h200-fit-seed1/quanto", "bench/results/quality-h200-fit-seed2/quanto",
        "bench/results/smol-h200-quanto-w4", "bench/results/smol-h200-hqq-w8",
        "bench/results/smol-h200-hqq-w4", "bench/results/smol-h200-quanto-w8",
        "bench/results/smol-h100-quanto", "bench/results/smol-h100-hqq")
BUDGETS = (2.25, 2.5, 3.0, 3.5)
BASELINES = ("sensitivity", "lim", "zscore", "activation")
BAR = {2.25: 0.8, 2.5: 0.8, 3.0: 1.0, 3.5: 1.0}
POOLS = {   # sub-pools the report judges: label prefixes
    "methods": ("impq", "local", "fit"),
    "fit-next": ("fit",) + tuple(f"fit-next{k}" for k in range(1, 8)),
    "fit+halves": ("fit", "fit-h1", "fit-h2"),
    "methods+halves": ("impq", "local", "fit", "fit-h1", "fit-h2"),
    "visited": tuple(f"visited{k}" for k in range(1, 8)),
    "visited+swaps": tuple(f"visited{k}" for k in range(1, 8)) + tuple(f"swap{k}" for k in range(1, 8)),
    "methods+swaps": ("impq", "local", "fit") + tuple(f"swap{k}" for k in range(1, 8)),
    "methods+halves+swaps": ("impq", "local", "fit", "fit-h1", "fit-h2") + tuple(f"swap{k}" for k in range(1, 8)),
    "all": None,
}


def pool(run: RunDir, b: float) -> dict:
    """The candidates of core.checked (the shipped pool) with IMPQ-fit's prediction of each
    and, for the visited states, the loss their walk measured."""
    D, P, costs = run.D(), run.P(), run.costs()
    if len(costs.levels) != 2:
        raise SystemExit(f"{run.path}: two levels only")
    cands, fitted, _ = candidates_of(D, P, costs, bits=b, paired=run.config.antithetic)
    X, y, _ = visited_states(D, P)
    walk = {tuple(int(v) for v in x): float(loss) for x, loss in zip(X, y)}
    out = {}
    for label, q in cands.items():
        out[label] = {"bits": list(costs.bits_of(q)), "fit": float(fitted.predict(np.array([q]))[0])}
        if label.startswith("visited"):
            out[label]["walk_loss"] = walk[q]
    return out


def candidates(args) -> int:
    spec = {"command": " ".join(["bench/checked.py"] + sys.argv[1:]), "runs": {}}
    for rd in args.runs:
        run = RunDir.open(str(ROOT / rd))
        t = time.perf_counter()
        spec["runs"][rd] = {str(b): pool(run, b) for b in args.bits}
        n = len({tuple(c["bits"]) for g in spec["runs"][rd].values() for c in g.values()})
        print(f"{rd}: {n} distinct candidates in {time.perf_counter() - t:.1f}s", flush=True)
    write_atomic(Path(args.out), json.dumps(spec, indent=0) + "\n")
    print(f"wrote {args.out}")
    return 0


def _open(rd: str, device: str, log) -> dict:
    """A run loaded as compare loads it: the real modules of both levels, the baselines'
    scores on its calibration windows, its costs and the evaluation tokens."""
    from core.compare import _baseline_scores, _costs, _load, calibration_windows
    from core.data import eval_tokens
    from core.switching import LayerSwitch

    run = RunDir.open(str(ROOT / rd))
    config = run.config
    loaded, backend, settings = _load(run, device, None, None, None, None, log)
    micro = max(1, config.micro_batch)
    calib = calibration_windows(loaded, config)
    tokens = eval_tokens(loaded.tokenizer, settings, config.calib_text, log)
    L = len(loaded.layers)
    real = LayerSwitch(loaded, backend, real=True, keep_original=True, levels=[config.levels] * L)
    real.restore_original()
    scores = _baseline_scores(loaded, calib, real, backend, micro)
    costs, _ = _costs(run, real, backend, config, log)
    return dict(run=run, config=config, loaded=loaded, micro=micro, calib=calib, tokens=tokens,
                real=real, scores=scores, costs=costs, L=L,
                qmodel=quadratic_model(run.D(), alpha=0.5, paired=config.antithetic))


def _baselines(o: dict, b: float) -> dict:
    from core import baselines

    return {"baseline:" + m: key(baselines.allocation(o["scores"][m], o["costs"], float(b),
                                                      a=o["qmodel"].a, K=o["qmodel"].K).bits_per_layer)
            for m in BASELINES}


def _evaluate(o: dict, wanted: set, extra: dict | None = None) -> tuple[dict, dict]:
    """{key: {eval_a, eval_b, calib, eval, ...}} of every allocation in `wanted` (and
    all-low, all-high), on both halves of the evaluation text, the calibration windows and
    any `extra` windows."""
    from core.switching import PrefixEvaluator
    from eval_allocations import evaluate_all

    loaded, micro, tokens = o["loaded"], o["micro"], o["tokens"]
    lo, hi = min(o["config"].levels), max(o["config"].levels)
    wanted = set(wanted) | {tuple([lo] * o["L"]), tuple([hi] * o["L"])}
    half = tokens.shape[0] // 2
    evaluators = {"eval_a": PrefixEvaluator(loaded, tokens[:half], micro),
                  "eval_b": PrefixEvaluator(loaded, tokens[half:], micro),
                  "calib": PrefixEvaluator(loaded, o["calib"], micro)}
    for name, windows in (extra or {}).items():
        evaluators[name] = PrefixEvaluator(loaded, windows, micro)
    rows = {}
    na, nb = evaluators["eval_a"].predicted, evaluators["eval_b"].predicted
    for bits, row in evaluate_all(o["real"], evaluators, wanted).items():
        row["eval"] = (row["eval_a"] * na + row["eval_b"] * nb) / (na + nb)
        rows[key(bits)] = row
    return rows, {n: int(ev.predicted) for n, ev in evaluators.items()}


def measure(args) -> int:
    import torch

    from core.compare import calibration_windows
    from eval_allocations import device_name

    spec = json.loads(Path(args.candidates).read_text())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg, level="info": print(msg, flush=True)   # noqa: E731
    for rd, groups in spec["runs"].items():
        if args.only and rd not in args.only:
            continue
        t0 = time.perf_counter()
        o = _open(rd, args.device, log)
        labels = {}
        for b, cands in groups.items():
            labels[b] = {lab: key(c["bits"]) for lab, c in cands.items()} | _baselines(o, b)
        wanted = {tuple(int(c) for c in bits) for g in labels.values() for bits in g.values()}
        extra = {}
        if args.windows:       # the candidates judged on other calibration windows too
            extra["judge"] = calibration_windows(o["loaded"], dataclasses.replace(o["config"], windows=args.windows))
        t = time.perf_counter()
        rows, tokens = _evaluate(o, wanted, extra)
        log(f"{rd}: {len(rows)} allocations in {time.perf_counter() - t:.1f}s")
        lo, hi = min(o["config"].levels), max(o["config"].levels)
        result = {"run": rd, "device": device_name(), "torch": torch.__version__,
                  "allocations": rows, "labels": labels, "all_low": key([lo] * o["L"]),
                  "all_high": key([hi] * o["L"]), "seconds": round(time.perf_counter() - t0, 1),
                  "tokens": tokens}
        name = rd.replace("bench/results/", "").replace("/", "_") + ".json"
        write_atomic(out_dir / name, json.dumps(result, indent=0) + "\n")
        del o
        torch.cuda.empty_cache()
    return 0


def descent(args) -> int:
    """IMPQ-fit, checked as shipped (core.checked.choose with its descent, on the shipped
    judge windows), per run and budget: the candidates' choice and the descent's, each
    evaluated on the evaluation text with the baselines' allocations (their ratios)."""
    import torch

    from core.checked import choose, measurer
    from core.compare import check_windows
    from eval_allocations import device_name

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg, level="info": print(msg, flush=True)   # noqa: E731
    for rd in args.runs:
        t0 = time.perf_counter()
        o = _open(rd, args.device, log)
        run, config = o["run"], o["config"]
        judge = check_windows(o["loaded"], config)
        measure = measurer(o["loaded"], o["real"], judge, o["micro"])
        evaluations = [0]

        def counted(wanted, measure=measure):
            evaluations[0] += len(wanted)
            return measure(wanted)

        budgets, wanted = {}, set()
        for b in args.bits:
            t = time.perf_counter()
            evaluations[0] = 0
            ch = choose(run.D(), run.P(), run.costs(), counted, bits=b, paired=config.antithetic)
            first = min((lab for lab in ch.measured if not lab.startswith("step")),
                        key=lambda lab: (ch.measured[lab], list(ch.measured).index(lab)))
            labels = {"candidates": key(ch.candidates[first]), "descent": key(ch.candidates[ch.label]),
                      "fit": key(ch.candidates["fit"])} | _baselines(o, b)
            budgets[str(b)] = {"labels": labels, "kept": ch.label, "first": first,
                               "measured": {lab: [key(ch.candidates[lab]), v] for lab, v in ch.measured.items()},
                               "evaluations": evaluations[0], "seconds": round(time.perf_counter() - t, 2)}
            wanted |= {tuple(int(c) for c in v) for v in labels.values()}
            log(f"{rd} {b}: {first} {ch.measured[first]:+.4f} -> {ch.label} {ch.measured[ch.label]:+.4f} "
                f"({evaluations[0]} evaluations)")
        rows, tokens = _evaluate(o, wanted, {"judge": judge})
        for b, row in budgets.items():
            ev = {lab: rows[k]["eval"] for lab, k in row["labels"].items()}
            best = min(v for lab, v in ev.items() if lab.startswith("baseline:"))
            row["ratio"] = {lab: math.exp(ev[lab] - best) for lab in ("fit", "candidates", "descent")}
            log(f"{rd} {b}: " + " ".join(f"{k} {v:.3f}" for k, v in row["ratio"].items()))
        lo, hi = min(config.levels), max(config.levels)
        result = {"run": rd, "device": device_name(), "torch": torch.__version__, "budgets": budgets,
                  "allocations": rows, "all_high": key([hi] * o["L"]), "all_low": key([lo] * o["L"]),
                  "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)}
        name = rd.replace("bench/results/", "").replace("/", "_") + ".json"
        write_atomic(out_dir / name, json.dumps(result, indent=0) + "\n")
        del o, measure
        torch.cuda.empty_cache()
    return 0


def report(args) -> int:
    spec = json.loads(Path(args.candidates).read_text())
    results = {}
    for path in args.results:
        r = json.loads(Path(path).read_text())
        results[r["run"]] = r
    out = {"command": " ".join(["bench/checked.py"] + sys.argv[1:]), "runs": {}, "tally": {}}
    tally = {}
    for rd, groups in spec["runs"].items():
        if rd not in results:
            continue
        r = results[rd]
        A, labels = r["allocations"], r["labels"]
        high = A[r["all_high"]]["calib"]
        walk_gap = max((abs(A[key]["calib"] - high - c["walk_loss"]), key)
                       for g in groups.values() for c in g.values() if "walk_loss" in c
                       for key in ["".join(map(str, c["bits"]))])
        run_out = {"walk_vs_measured_max_nats": walk_gap[0], "budgets": {}}
        for b, labs in labels.items():
            ev = {lab: A[k]["eval"] for lab, k in labs.items()}
            judge = args.key if args.key in A[r["all_high"]] else "calib"   # 16-window runs: their own
            ca = {lab: A[k][judge] for lab, k in labs.items()}
            best_base = min(ev["baseline:" + m] for m in BASELINES)
            ratio = lambda lab: math.exp(ev[lab] - best_base)   # noqa: E731
            row = {"single": {lab: ratio(lab) for lab in ("impq", "local", "fit") if lab in ev},
                   "oracle": min(ratio(lab) for lab in labs), "picks": {}}
            for name, members in POOLS.items():
                inside = [lab for lab in labs if not lab.startswith("baseline:")
                          and (members is None or lab in members)]
                if not inside:
                    continue
                pick = min(inside, key=lambda lab: ca[lab])
                row["picks"][name] = {"label": pick, "ratio": ratio(pick), "measured": len(inside)}
            run_out["budgets"][b] = row
            bar = BAR[float(b)]
            for name in ("impq", "local", "fit"):
                t = tally.setdefault(name, [0, 0])
                t[0] += row["single"].get(name, math.inf) <= bar
                t[1] += 1
            for name, p in row["picks"].items():
                t = tally.setdefault("checked:" + name, [0, 0])
                t[0] += p["ratio"] <= bar
                t[1] += 1
        out["runs"][rd] = run_out
        print(f"\n{rd} (walk losses vs measured: max {walk_gap[0]:.2e} nats)")
        for b, row in run_out["budgets"].items():
            s = " ".join(f"{k} {v:.3f}" for k, v in row["single"].items())
            p = " ".join(f"{k}={v['ratio']:.3f}" for k, v in row["picks"].items())
            print(f"  {b}: {s} | oracle {row['oracle']:.3f} | checked {p}")
    out["tally"] = {k: f"{v[0]} of {v[1]}" for k, v in tally.items()}
    print("\nbar met:", json.dumps(out["tally"], indent=1))
    if args.out:
        write_atomic(Path(args.out), json.dumps(out, indent=1) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("candidates")
    c.add_argument("--runs", nargs="+", default=list(RUNS))
    c.add_argument("--bits", nargs="+", type=float, default=list(BUDGETS))
    c.add_argument("--out", required=True)
    m = sub.add_parser("measure")
    m.add_argument("candidates")
    m.add_argument("--device", default="cuda")
    m.add_argument("--only", nargs="*")
    m.add_argument("--windows", type=int, help="also measure each allocation on this many "
                   "calibration windows of the run's text and seed (key 'judge')")
    m.add_argument("--out", required=True)
    d = sub.add_parser("descent")
    d.add_argument("--runs", nargs="+", default=list(RUNS))
    d.add_argument("--bits", nargs="+", type=float, default=list(BUDGETS))
    d.add_argument("--device", default="cuda")
    d.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("candidates")
    r.add_argument("results", nargs="+")
    r.add_argument("--key", default="calib", help="what the candidates are judged on: calib (the "
                   "run's windows) or judge (measure --windows; runs without it: calib)")
    r.add_argument("--out")
    args = p.parse_args()
    return {"candidates": candidates, "measure": measure, "descent": descent,
            "report": report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
