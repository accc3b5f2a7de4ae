"""IMPQ-fit's variants judged by real losses, not by another fit (issue 20; candidates on the
CPU, their losses on the GPU by bench/eval_allocations.py, the report on the CPU).

bench/fit_variants.py judged each variant's allocation by a fit of the other half of the
samples. That judge shares the quadratic's misspecification: at 3.0 and 3.5 bits with
quanto it predicted 2.75-2.85 nats for allocations whose real calibration loss was
3.5-3.9. Here every allocation is evaluated for real: on the run's calibration windows
(the text SPQE measured, so a design may be chosen on it) and on the two halves of the
evaluation text.

  candidates  for each run and budget (2.25/2.5/3.0/3.5 bits): the allocations of the
              methods in bench/results/quality-h200-fit/compare_<backend>.json (IMPQ,
              IMPQ-local, IMPQ-fit of that study, the four baselines); every variant of
              bench/fit_variants.py ("quadratic" is IMPQ-fit without its size term,
              "size" the quadratic plus f(n), IMPQ-fit since this study) and "wls" (the
              quadratic by least squares weighted by 1 / the variance of the states of
              each size), each fitted on all samples and on either half; and anchored
              choices (an idea against the optimizer's curse): the best visited state of
              the budget's size ("visited"), and the fit's best state within 1 or 2 swaps
              of a visited state, or reached from one by the fit's steepest descent, the
              anchor's measured loss plus the fit's difference deciding ("r2", "r4",
              "descend").
  report      paired differences in real loss of every variant against the quadratic
              over the 4 budgets x 3 fits (all samples, each half) per backend, on the
              calibration windows and the evaluation text, and each all-sample variant's
              perplexity over the best baseline's.

    python bench/fit_real.py candidates --out bench/results/fit_real_candidates.json
    python bench/eval_allocations.py bench/results/fit_real_candidates.json --device cuda --out real.json
    python bench/fit_real.py report real.json --out bench/results/fit_real.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core.fit import LAMBDAS, MAX_FOLDS, visited_states  # noqa: E402
from core.runs import RunDir  # noqa: E402
from core.solver import solve  # noqa: E402
from fit_variants import CV, features, models_at, penalty_mask, ridge, sizes_of, solve_sized, unpack  # noqa: E402

RUNS = ("bench/results/smol-h100-quanto", "bench/results/smol-h100-hqq")
COMPARE = "bench/results/quality-h200-fit"
BASELINES = ("sensitivity", "lim", "zscore", "activation")
FITS = ("all", "h1", "h2")


def fit_wls(D, P):
    """The quadratic weighted by 1 / var(y | n): the states of few low layers, whose losses
    are small, count as much as those near collapse. Penalty by CV over walks (weighted)."""
    X, y, walk = visited_states(D, P)
    L = X.shape[1]
    n = X.sum(axis=1).astype(int)
    var = np.array([y[n == k].var() if (n == k).sum() > 1 else 0.0 for k in range(L + 1)])
    var[0] = var[1] if var[1] > 0 else 1.0
    w = 1.0 / np.maximum(var[n], 1e-3 * var.max())
    F, yy = features(X, False) * np.sqrt(w)[:, None], y * np.sqrt(w)
    mask, G, b = penalty_mask(L, False), F.T @ F, F.T @ yy
    scale = float(np.mean(np.diag(G)))
    ids = np.unique(walk)
    fold = (np.random.default_rng(0).permutation(len(ids)) % MAX_FOLDS)[np.searchsorted(ids, walk)]
    errors = []
    for rel in LAMBDAS:
        e = 0.0
        for k in range(MAX_FOLDS):
            h = fold == k
            beta = ridge(G - F[h].T @ F[h], b - F[h].T @ yy[h], mask, rel * scale)
            e += float(np.sum((F[h] @ beta - yy[h]) ** 2))
        errors.append(e)
    u, W, _ = unpack(ridge(G, b, mask, LAMBDAS[int(np.argmin(errors))] * scale), L, False)
    return u, W


def _swaps(s, k):
    """the states k swaps (k low layers raised, k high ones lowered) from s"""
    low, high = np.flatnonzero(s == 1), np.flatnonzero(s == 0)
    out = []
    for a in itertools.combinations(low, k):
        for b in itertools.combinations(high, k):
            x = s.copy()
            x[list(a)], x[list(b)] = 0, 1
            out.append(x)
    return np.array(out) if out else np.zeros((0, len(s)))


def _descend(m, s):
    """the fit m's steepest descent by single swaps from state s"""
    x, value = s.copy(), m.score(s[None])[0]
    while True:
        nb = _swaps(x, 1)
        p = m.score(nb)
        j = int(np.argmin(p))
        if p[j] >= value - 1e-12:
            return x
        x, value = nb[j], p[j]


def anchored(D, P, N: int) -> dict:
    """visited, r2, r4, descend at N low layers (equal layer costs), from the plain quadratic."""
    X, y, _ = visited_states(D, P)
    m = CV(X, y, np.repeat(np.arange(len(D)), D.shape[1] + 1)).model("quadratic", ("id",))
    n = X.sum(axis=1).astype(int)
    at = np.flatnonzero(n == N)
    at = at[np.argsort(y[at], kind="stable")]
    own = m.score(X[at])
    out = {"visited": X[at[0]]}
    for name, moves in (("r2", lambda s: _swaps(s, 1)),
                        ("r4", lambda s: np.concatenate([_swaps(s, 2), _swaps(s, 1)])),
                        ("descend", lambda s: _descend(m, s)[None])):
        best, chosen = math.inf, None
        for i, p_i in zip(at, own):
            cand = moves(X[i])
            p = m.score(cand)
            j = int(np.argmin(p))
            if y[i] + p[j] - p_i < best:
                best, chosen = y[i] + p[j] - p_i, cand[j]
        out[name] = chosen
    return out


def candidates(args) -> int:
    spec = {"runs": {}}
    for rd in args.runs:
        run = RunDir.open(str(ROOT / rd))
        D, P, costs = run.D(), run.P(), run.costs()
        M, L = D.shape
        compare = json.loads((ROOT / args.compare / f"compare_{run.config.backend}.json").read_text())
        sizes = sizes_of(compare, L)
        groups = {str(b): {} for b in sizes}
        for r in compare["results"]:
            if r.get("target_bits") in sizes:
                groups[str(r["target_bits"])]["method:" + r["method"]] = list(r["bits_per_layer"])
        for name, part in zip(FITS, (slice(0, M), slice(0, M // 2), slice(M // 2, M))):
            glob, local = models_at(D[part], P[part], sorted(set(sizes.values())))
            glob["quadratic"] = glob.pop("fit")
            u, W = fit_wls(D[part], P[part])
            for b, N in sizes.items():
                chosen = {}
                for v, m in {**glob, **local[N]}.items():
                    chosen[v] = solve_sized(m, N) if m.f.any() else solve(m.u, m.W / 2, costs, bits=b).q
                chosen["wls"] = solve(u, W / 2, costs, bits=b).q
                chosen.update(anchored(D[part], P[part], N))
                for v, q in chosen.items():
                    groups[str(b)][f"{name}:{v}"] = [2 if x else 4 for x in np.asarray(q).astype(int)]
            print(f"{rd} {name}: done", flush=True)
        spec["runs"][rd] = groups
    Path(args.out).write_text(json.dumps(spec, indent=0) + "\n")
    print(f"wrote {args.out}")
    return 0


def report(args) -> int:
    spec = json.loads((ROOT / args.candidates).read_text())
    merged: dict[str, dict] = {}
    for path in args.results:
        for rd, r in json.loads(Path(path).read_text())["runs"].items():
            merged.setdefault(rd, {}).update(r["allocations"])
    key = lambda bits: "".join(str(int(b)) for b in bits)   # noqa: E731
    out = {"command": " ".join(["bench/fit_real.py"] + sys.argv[1:]), "runs": {}}
    for rd, groups in spec["runs"].items():
        A = merged[rd]
        variants = sorted({lab.split(":", 1)[1] for g in groups.values() for lab in g if lab.startswith("all:")})
        missing = [lab for g in groups.values() for lab, bits in g.items() if key(bits) not in A]
        if missing:
            raise SystemExit(f"{rd}: {len(missing)} allocations were not evaluated, e.g. {missing[0]}")
        paired = {}
        for part in ("calib", "eval"):
            paired[part] = {}
            for v in variants:
                d = np.array([A[key(g[f"{h}:{v}"])][part] - A[key(g[f"{h}:quadratic"])][part]
                              for g in groups.values() for h in FITS])
                paired[part][v] = {"mean_nats": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))),
                                   "better": int((d < 0).sum()), "worse": int((d > 0).sum()), "pairs": len(d)}
        ratios = {}
        for b, g in groups.items():
            best = min(A[key(g["method:" + m])]["eval"] for m in BASELINES)
            ratios[b] = {lab.split(":", 1)[1]: math.exp(A[key(bits)]["eval"] - best)
                         for lab, bits in g.items() if lab.startswith(("all:", "method:impq"))}
        out["runs"][rd] = {"paired_vs_quadratic": paired, "ppl_over_best_baseline": ratios}
        print(f"\n{rd}: real loss minus the quadratic's, 4 budgets x 3 fits (nats, se; better/worse)")
        for v in variants:
            c, e = paired["calib"][v], paired["eval"][v]
            print(f"  {v:10s} calib {c['mean_nats']:+.3f} ({c['se']:.3f}) {c['better']}/{c['worse']}"
                  f"   eval {e['mean_nats']:+.3f} ({e['se']:.3f}) {e['better']}/{e['worse']}")
        print("  perplexity over the best baseline, fitted on all samples:")
        for b, r in ratios.items():
            print(f"  {b:5s} " + " ".join(f"{v} {x:.2f}" for v, x in sorted(r.items())))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("candidates")
    c.add_argument("--runs", nargs="+", default=list(RUNS))
    c.add_argument("--compare", default=COMPARE)
    c.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("results", nargs="+", help="bench/eval_allocations.py outputs")
    r.add_argument("--candidates", default="bench/results/fit_real_candidates.json")
    r.add_argument("--out")
    args = p.parse_args()
    return candidates(args) if args.what == "candidates" else report(args)


if __name__ == "__main__":
    sys.exit(main())
