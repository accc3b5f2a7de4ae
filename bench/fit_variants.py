"""Variants of IMPQ-fit's state model, compared offline where IMPQ-fit misses the bar (a benchmark).

IMPQ-fit (core.fit) fits v(S) - v({}) ~ u.x + sum_{i<j} w_ij x_i x_j by ridge regression
to every state the SPQE walks visited. On quanto it misses the issue's bar at 2.25 and
3.0 bits, where the loss is near saturation. This script asks, on calibration walks and
the allocations whose real perplexity is already known (no new evaluation, CPU only),
whether a better-founded fit ranks the states a budget decides among better:

  fit         the quadratic alone (IMPQ-fit when this study was made; core.fit now adds "size")
  log         the quadratic fitted to g(y) = log(y + c); c and the ridge penalty by CV
  sat         the quadratic fitted to g(y) = -log(1 - y / Y), Y = k max(y) (a saturating
              link, y = Y (1 - exp(-quadratic))); k and the penalty by CV
  size        the quadratic plus a free function f(n) of the number n of low layers
              (f(0) = f(1) = 0, unpenalized), so the pairwise terms need not model the
              saturation along size
  log+size    both
  window      the plain fit on states within +-h sizes of the budget's size, h by CV
  rankcv      the family (fit, log c, sat k) and penalty picked per budget by the CV
              within-size rank correlation at the budget's size (calibration walks only)

Every link is increasing, so ranking and the argmin under a budget are the quadratic's:
the same SCIP program (core.solver.solve with a = u, K = W / 2) solves log, sat, window and
rankcv. The size variants are solved by a program with one auxiliary binary per size.

Measured per backend and budget (2.25/2.5/3.0/3.5 bits: 27/23/15/8 of 30 layers low, all
layers cost the same bytes):
  held-out states: the first 80 samples fit, the other samples' walks are the test (as
  bench/fit_prediction.py), and 9 more random 80/rest splits; RMSE (nats) over all test
  states and within-size Spearman at the budget's size (mean over the 10 splits, and the
  first split alone);
  real allocations: every method's allocation at the budget in
  bench/results/quality-h200-fit/compare_<backend>.json with its held-out NLL; each
  variant fitted on all samples predicts them, Spearman with the real NLL; each variant's
  own allocation at the budget and its Hamming distance to each method's;
  cross-fit judgement (the optimizer's curse): a variant fitted on half of the samples
  solves the budget, and the plain fit and the size-term fit of the other half judge that
  allocation (crossfit()); means over 4 random halvings x both roles, and the paired
  difference to the plain fit with its standard error.

    .venv/bin/python bench/fit_variants.py --out bench/results/fit_variants.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyscipopt as scip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.fit import LAMBDAS, MAX_FOLDS, visited_states  # noqa: E402
from core.runs import RunDir  # noqa: E402
from core.solver import solve  # noqa: E402

BITS = (2.25, 2.5, 3.0, 3.5)
LOG_C = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SAT_K = (1.02, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0)
WINDOWS = (1, 2, 4, 8)


def spearman(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(a):
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for v in np.unique(a):               # ties share their mean rank
        m = a == v
        r[m] = r[m].mean()
    return r


# ---- links -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    name: str
    param: float = 0.0
    Y: float = 0.0   # sat: the ceiling, set from the training states

    def g(self, y):
        if self.name == "log":
            return np.log(y + self.param)
        if self.name == "sat":
            return -np.log1p(-y / self.Y)
        return y

    def inv(self, s):
        if self.name == "log":
            return np.exp(np.minimum(s, 50)) - self.param
        if self.name == "sat":
            return self.Y * -np.expm1(-s)
        return s


def links_for(name: str, y_train) -> list[Link]:
    if name == "log":
        return [Link("log", c) for c in LOG_C]
    if name == "sat":
        top = float(np.max(y_train))
        return [Link("sat", k, k * top) for k in SAT_K]
    return [Link("id")]


# ---- features and ridge ----------------------------------------------------------------
def features(X, size_term: bool):
    L = X.shape[1]
    i, j = np.triu_indices(L, k=1)
    cols = [X, X[:, i] * X[:, j]]
    if size_term:                        # one-hot of n = 2..L (f(0) = f(1) = 0 identifies u)
        n = X.sum(axis=1).astype(int)
        cols.append((n[:, None] == np.arange(2, L + 1)[None, :]).astype(float))
    return np.concatenate(cols, axis=1)


def penalty_mask(L: int, size_term: bool):
    m = np.zeros(L + L * (L - 1) // 2 + (L - 1 if size_term else 0))
    m[L:L + L * (L - 1) // 2] = 1.0      # only the pairwise terms are penalized
    return m


def ridge(G, b, mask, lam):
    return np.linalg.solve(G + np.diag(lam * mask + 1e-9 * lam * (1 - mask) + 1e-12), b)


@dataclass
class Model:
    name: str
    u: np.ndarray
    W: np.ndarray
    f: np.ndarray          # [L + 1] size term, zeros without one
    link: Link
    lam: float
    info: dict

    def score(self, X):
        """the quadratic (link scale); ranks states like the predicted loss"""
        X = np.asarray(X, float)
        n = X.sum(axis=1).astype(int)
        return X @ self.u + 0.5 * np.einsum("ni,ij,nj->n", X, self.W, X) + self.f[n]

    def predict(self, X):
        return self.link.inv(self.score(X))


def unpack(beta, L, size_term):
    u = beta[:L]
    W = np.zeros((L, L))
    i, j = np.triu_indices(L, k=1)
    W[i, j] = W[j, i] = beta[L:L + len(i)]
    f = np.zeros(L + 1)
    if size_term:
        f[2:] = beta[L + len(i):]
    return u, W, f


class CV:
    """Ridge fits of the quadratic (plus f(n) with size_term) to g(y) for every link of
    the families id, log and sat and every penalty, with their predictions on held-out
    walks (5 folds of whole walks, as core.fit): one factorization per fold and penalty
    serves every link."""

    def __init__(self, X, y, walk, *, size_term=False, seed=0):
        L = X.shape[1]
        self.X, self.y, self.L, self.size_term = X, y, L, size_term
        self.n = X.sum(axis=1).astype(int)
        F = features(X, size_term)
        self.F, self.mask = F, penalty_mask(L, size_term)
        self.G = F.T @ F
        self.scale = float(np.mean(np.diag(self.G)))
        ids = np.unique(walk)
        perm = np.random.default_rng(seed).permutation(len(ids)) % min(MAX_FOLDS, len(ids))
        self.fold = perm[np.searchsorted(ids, walk)]
        self.links = [lk for fam in ("id", "log", "sat") for lk in links_for(fam, y)]
        GY = np.stack([lk.g(y) for lk in self.links], axis=1)          # [n, links]
        self.GY, B = GY, F.T @ GY
        self.pred = np.zeros((len(LAMBDAS), len(y), len(self.links)))   # link scale
        for k in range(self.fold.max() + 1):
            h = self.fold == k
            G_t, B_t = self.G - F[h].T @ F[h], B - F[h].T @ GY[h]
            for li, rel in enumerate(LAMBDAS):
                self.pred[li, h] = F[h] @ ridge(G_t, B_t, self.mask, rel * self.scale)

    def select(self, families, criterion="rmse", target_size=None):
        """(crit, link index, lambda index) minimizing CV RMSE in nats, or minus the mean
        within-size Spearman of held-out walks' states at target_size - 1..target_size + 1."""
        best = None
        for ki, lk in enumerate(self.links):
            fam = lk.name
            if fam not in families:
                continue
            for li in range(len(LAMBDAS)):
                p = self.pred[li, :, ki]
                if criterion == "rmse":
                    crit = float(np.sqrt(np.mean((lk.inv(p) - self.y) ** 2)))
                else:
                    rho = [spearman(p[m], self.y[m]) for s in (target_size - 1, target_size, target_size + 1)
                           for k in range(self.fold.max() + 1) for m in [(self.n == s) & (self.fold == k)]]
                    crit = -float(np.nanmean(rho))
                if best is None or crit < best[0]:
                    best = (crit, ki, li)
        return best

    def model(self, name, families, criterion="rmse", target_size=None) -> "Model":
        crit, ki, li = self.select(families, criterion, target_size)
        lam = LAMBDAS[li] * self.scale
        link = self.links[ki]
        beta = ridge(self.G, self.F.T @ self.GY[:, ki], self.mask, lam)
        u, W, f = unpack(beta, self.L, self.size_term)
        return Model(name, u, W, f, link, lam, {"cv": crit, "link": link.name, "link_param": link.param,
                                                "lam_rel": LAMBDAS[li]})


def fit_window(X, y, walk, N: int) -> Model:
    """The plain fit on states within +-h sizes of N; h by CV RMSE on held-out walks' states of size N."""
    n = X.sum(axis=1).astype(int)
    L = X.shape[1]
    best = None
    ids = np.unique(walk)
    fold = (np.random.default_rng(0).permutation(len(ids)) % MAX_FOLDS)[np.searchsorted(ids, walk)]
    for h in WINDOWS:
        rows = np.abs(n - N) <= h
        F = features(X[rows], False)
        mask = penalty_mask(L, False)
        G, yy, ff, nn = F.T @ F, y[rows], fold[rows], n[rows]
        scale = float(np.mean(np.diag(G)))
        b = F.T @ yy
        for rel in LAMBDAS:
            err = 0.0
            for k in range(MAX_FOLDS):
                hk = ff == k
                beta = ridge(G - F[hk].T @ F[hk], b - F[hk].T @ yy[hk], mask, rel * scale)
                t = hk & (nn == N)
                err += float(np.sum((F[t] @ beta - yy[t]) ** 2))
            if best is None or err < best[0]:
                best = (err, h, rel * scale, rows)
    _, h, lam, rows = best
    F = features(X[rows], False)
    beta = ridge(F.T @ F, F.T @ y[rows], penalty_mask(L, False), lam)
    u, W, f = unpack(beta, L, False)
    return Model("window", u, W, f, Link("id"), lam, {"h": h})


def fit_core(D, P) -> Model:
    """The quadratic alone: IMPQ-fit as it was when this study was made (core.fit has since
    taken the size term, the variant "size" here; bench/fit_real.py judged them for real)."""
    X, y, walk = visited_states(D, P)
    m = CV(X, y, walk).model("fit", ("id",))
    return Model("fit", m.u, m.W, m.f, m.link, m.lam, {"cv": m.info["cv"]})


def _info(m) -> dict:
    return {k: (x if isinstance(x, str) else float(x)) for k, x in m.info.items()}


def sizes_of(compare: dict, L: int) -> dict:
    """the number of low layers every allocation at each budget has (equal layer costs)"""
    out = {}
    for b in BITS:
        n = {L - r["layers_high"] for r in compare["results"] if r.get("target_bits") == b}
        assert len(n) == 1, n
        out[b] = n.pop()
    return out


def models_at(D, P, sizes, with_global=True) -> tuple[dict, dict]:
    """The budget-free variants, and {N: {window, rankcv}} for each budget size N."""
    X, y, walk = visited_states(D, P)
    plain = CV(X, y, walk)
    glob = {}
    if with_global:
        sized = CV(X, y, walk, size_term=True)
        glob = {"fit": fit_core(D, P), "log": plain.model("log", ("log",)),
                "sat": plain.model("sat", ("sat",)), "size": sized.model("size", ("id",)),
                "log+size": sized.model("log+size", ("log",)), "sat+size": sized.model("sat+size", ("sat",))}
    local = {}
    for N in sizes:
        m = plain.model("rankcv", ("id", "log", "sat"), "rank", N)
        local[N] = {"window": fit_window(X, y, walk, N), "rankcv": m}
    return glob, local


VARIANTS = ("fit", "log", "sat", "size", "log+size", "sat+size", "window", "rankcv")


def heldout(D, P, sizes, splits: int, train: int) -> dict:
    M, L = D.shape
    orders = [np.arange(M)] + [np.random.default_rng(100 + s).permutation(M) for s in range(splits - 1)]
    res = {b: {v: {"rmse": [], "rho": [], "rho_pm1": [], "rmse_at_size": []} for v in VARIANTS} for b in sizes}
    chosen = {v: [] for v in VARIANTS}
    for order in orders:
        tr, te = order[:train], order[train:]
        Xt, yt, _ = visited_states(D[te], P[te])
        nt = Xt.sum(axis=1).astype(int)
        glob, locals_ = models_at(D[tr], P[tr], sorted(set(sizes.values())))
        for b, N in sizes.items():
            local = locals_[N]
            for v, m in {**glob, **local}.items():
                pred, s = m.predict(Xt), m.score(Xt)
                r = res[b][v]
                r["rmse"].append(float(np.sqrt(np.mean((pred - yt) ** 2))))
                at = nt == N
                r["rmse_at_size"].append(float(np.sqrt(np.mean((pred[at] - yt[at]) ** 2))))
                r["rho"].append(spearman(s[at], yt[at]))
                r["rho_pm1"].append(float(np.nanmean([spearman(s[nt == k], yt[nt == k]) for k in (N - 1, N, N + 1)])))
                if v in ("window", "rankcv"):
                    chosen[v].append({"bits": b, **_info(m)})
        for v, m in glob.items():
            chosen[v].append(_info(m))
    summary = {}
    for b in sizes:
        summary[str(b)] = {}
        for v in VARIANTS:
            r = res[b][v]
            summary[str(b)][v] = {
                "rmse_nats": float(np.mean(r["rmse"])), "rmse_at_size": float(np.mean(r["rmse_at_size"])),
                "rho_at_size": float(np.nanmean(r["rho"])),
                "rho_at_size_se": float(np.nanstd(r["rho"]) / np.sqrt(len(r["rho"]))),
                "rho_size_pm1": float(np.nanmean(r["rho_pm1"])),
                "rho_at_size_first_split": r["rho"][0], "rmse_first_split": r["rmse"][0]}
    return {"splits": splits, "train": train, "by_bits": summary, "chosen": chosen}


# ---- solving -------------------------------------------------------------------------
def solve_sized(m: Model, N: int) -> list[int]:
    """argmin over x with at least N low layers of the quadratic + f(n), one auxiliary
    binary per size (the size term's program; equal layer costs)."""
    L = len(m.u)
    mod = scip.Model()
    mod.hideOutput()
    x = [mod.addVar(vtype="B", obj=float(m.u[i])) for i in range(L)]
    for i in range(L):
        for j in range(i + 1, L):
            w = float(m.W[i, j])
            if w == 0:
                continue
            yv = mod.addVar(lb=0.0, ub=1.0, obj=w)
            if w > 0:
                mod.addCons(yv >= x[i] + x[j] - 1)
            else:
                mod.addCons(yv <= x[i])
                mod.addCons(yv <= x[j])
    z = {n: mod.addVar(vtype="B", obj=float(m.f[n])) for n in range(N, L + 1)}
    mod.addCons(scip.quicksum(z.values()) == 1)
    mod.addCons(scip.quicksum(x) == scip.quicksum(n * z[n] for n in z))
    mod.optimize()
    return [round(mod.getVal(v)) for v in x]


def real_proxy(D, P, run, compare_path: Path, sizes) -> dict:
    cmp = json.loads(compare_path.read_text())
    costs = run.costs()
    L = D.shape[1]
    glob, locals_ = models_at(D, P, sorted(set(sizes.values())))
    out = {}
    for b, N in sizes.items():
        rows = [r for r in cmp["results"] if r.get("target_bits") == b]
        Q = np.array([[1 if bb == 2 else 0 for bb in r["bits_per_layer"]] for r in rows], float)
        nll = np.array([r["nll"] for r in rows])
        methods = [r["method"] for r in rows]
        ms = {**glob, **locals_[N]}
        entry = {"methods": dict(zip(methods, nll.round(4).tolist())), "variants": {}}
        for v, m in ms.items():
            if m.f.any():
                q = solve_sized(m, N)
            else:
                q = list(solve(m.u, m.W / 2, costs, bits=b).q)
            q_arr = np.array(q, float)
            s = m.score(Q)
            entry["variants"][v] = {
                "spearman_pred_vs_real_nll": spearman(s, nll),
                "predicted_best": methods[int(np.argmin(s))],
                "predicted_nll_delta": dict(zip(methods, m.predict(Q).round(3).tolist())),
                "allocation": "".join(str(int(t)) for t in q), "low_layers": int(sum(q)),
                "hamming": {mt: int(np.sum(q_arr != Q[k])) for k, mt in enumerate(methods)},
                "info": _info(m)}
        out[str(b)] = entry
    return out


def crossfit(D, P, costs, compare: dict, sizes, reps: int) -> dict:
    """The optimizer's curse, measured without evaluations: split the samples into halves
    A and B; each variant fitted on A solves the budget, and models fitted on B alone (the
    plain fit, and the fit with the size term) judge that allocation's loss, against the
    loss that A's own model predicts for it and B's judgement of every method's allocation
    in the compare file (those were chosen on all samples, B included: optimistic for
    IMPQ-fit's and IMPQ's rows). Both halves take each role; reps random halvings."""
    M = len(D)
    judged = {b: {} for b in sizes}
    for rep in range(reps):
        perm = np.random.default_rng(1000 + rep).permutation(M)
        for tr, te in ((perm[:M // 2], perm[M // 2:]), (perm[M // 2:], perm[:M // 2])):
            glob, locals_ = models_at(D[tr], P[tr], sorted(set(sizes.values())))
            Xe, ye, we = visited_states(D[te], P[te])
            judges = {"plain": CV(Xe, ye, we).model("judge", ("id",)),
                      "size": CV(Xe, ye, we, size_term=True).model("judge", ("id",))}
            for b, N in sizes.items():
                rows = [r for r in compare["results"] if r.get("target_bits") == b]
                for v, m in {**glob, **locals_[N]}.items():
                    q = np.array(solve_sized(m, N) if m.f.any() else solve(m.u, m.W / 2, costs, bits=b).q, float)[None]
                    rec = judged[b].setdefault(v, {"own": [], "plain": [], "size": []})
                    rec["own"].append(float(m.predict(q)[0]))
                    for jn, j in judges.items():
                        rec[jn].append(float(j.predict(q)[0]))
                for r in rows:
                    q = np.array([[1.0 if x == 2 else 0.0 for x in r["bits_per_layer"]]])
                    rec = judged[b].setdefault("alloc:" + r["method"], {"plain": [], "size": []})
                    for jn, j in judges.items():
                        rec[jn].append(float(j.predict(q)[0]))
    out = {}
    for b in sizes:
        ref = {jn: np.array(judged[b]["fit"][jn]) for jn in ("plain", "size")}
        out[str(b)] = {}
        for v, rec in judged[b].items():
            e = {}
            for key, vals in rec.items():
                vals = np.array(vals)
                e[key] = float(vals.mean())
                if key in ("plain", "size"):
                    d = vals - ref[key]
                    e[key + "_minus_fit"] = float(d.mean())
                    e[key + "_minus_fit_se"] = float(d.std(ddof=1) / np.sqrt(len(d)))
            out[str(b)][v] = e
    return {"halvings": reps, "by_bits": out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["bench/results/smol-h100-quanto", "bench/results/smol-h100-hqq"])
    parser.add_argument("--compare", default="bench/results/quality-h200-fit")
    parser.add_argument("--train", type=int, default=80)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--halvings", type=int, default=4, help="random halvings for the cross-fit judgement")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = []
    for rd in args.runs:
        t0 = time.perf_counter()
        run = RunDir.open(rd)
        D, P = run.D(), run.P()
        backend = run.config.backend
        sizes = sizes_of(json.loads((Path(args.compare) / f"compare_{backend}.json").read_text()), D.shape[1])
        ho = heldout(D, P, sizes, args.splits, args.train)
        rp = real_proxy(D, P, run, Path(args.compare) / f"compare_{backend}.json", sizes)
        cf = crossfit(D, P, run.costs(), json.loads((Path(args.compare) / f"compare_{backend}.json").read_text()),
                      sizes, args.halvings)
        report.append({"run": rd, "backend": backend, "samples": len(D), "low_layers_at_bits": {str(k): v for k, v in sizes.items()},
                       "heldout": ho, "real_allocations": rp, "crossfit": cf, "seconds": time.perf_counter() - t0})
        for b in sizes:
            print(f"\n{backend} {b} bits ({sizes[b]} low)   rmse  rho@N (se)   rho N+-1  rho first  | rho real  pick  low  ham-to-fit  ham-to-best"
                  "  | judged-size (vs fit, se)  own")
            ms = rp[str(b)]
            best = min(ms["methods"], key=ms["methods"].get)
            for v in VARIANTS:
                h, r, c = ho["by_bits"][str(b)][v], ms["variants"][v], cf["by_bits"][str(b)][v]
                print(f"  {v:9s} {h['rmse_nats']:6.3f} {h['rho_at_size']:6.3f} ({h['rho_at_size_se']:.3f}) {h['rho_size_pm1']:6.3f} "
                      f"{h['rho_at_size_first_split']:6.3f}  | {r['spearman_pred_vs_real_nll']:6.3f} {r['predicted_best']:>10s} "
                      f"{r['low_layers']:3d} {r['hamming']['impq-fit']:3d} {r['hamming'][best]:3d} ({best})"
                      f"  | {c['size']:6.3f} ({c['size_minus_fit']:+.3f}, {c['size_minus_fit_se']:.3f}) {c['own']:6.3f}")
            for k, c in cf["by_bits"][str(b)].items():
                if k.startswith("alloc:"):
                    print(f"  {k:22s} judged {c['size']:6.3f} (plain judge {c['plain']:6.3f})")
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
