"""The allocation: which layers stay at low precision under a memory budget (METHOD.md).

q_i = 1 keeps layer i at low precision (2-bit), q_i = 0 raises it to high (4-bit).
IMPQ minimizes Delta(q) = a.q + q.K.q subject to B_lo + sum_i c_i (1 - q_i) <= B, as a
MILP in which each product q_i q_j is replaced by a continuous y_ij (or, the same optimum,
Glover's one z_i per drop, or a compact convex form while a run has few samples:
_Programs picks). The baselines solve a knapsack under the same constraint. Both go to SCIP.

With more than two levels (our extension, METHOD.md's "Levels" in the README) the
variables are drops: q[i, k] = 1 when layer i has taken its (k+1)-th step down from the
highest level, with q[i, k+1] <= q[i, k], each drop saving its real bytes; the same
program over L x (levels - 1) variables. With two levels it is the paper's program.

Byte counts reach 1e10 while SCIP's feasibility tolerance is relative (1e-6), so SCIP
may call a solution a few kilobytes over the budget feasible. Every solution is checked
in exact integer arithmetic; one that is over is cut off and the model re-solved.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import pyscipopt as scip

from core.errors import InvalidField, UserError
from core.interactions import budget_local_model, predicted_delta, quadratic_model

LOW_BITS, HIGH_BITS = 2, 4
_MAX_CUTS = 50  # over-budget solutions cut off before giving up; in practice 0 or 1


@dataclass(frozen=True)
class Costs:
    m_lo: tuple[int, ...]    # bytes of layer i at the lowest level, metadata included
    m_hi: tuple[int, ...]    # bytes of layer i at the highest level, metadata included
    params: tuple[int, ...]  # quantized weights in layer i
    levels: tuple[int, ...] = (LOW_BITS, HIGH_BITS)   # the precisions, ascending
    mid: tuple[tuple[int, ...], ...] = ()              # bytes at each level between, ascending

    def __post_init__(self):
        for name in ("m_lo", "m_hi", "params", "levels"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        object.__setattr__(self, "mid", tuple(tuple(int(x) for x in m) for m in self.mid))
        if not len(self.m_lo) == len(self.m_hi) == len(self.params) > 0:
            raise ValueError("m_lo, m_hi and params need one entry per layer, at least one layer")
        if len(self.levels) < 2 or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must be at least two distinct precisions, ascending: {self.levels}")
        if len(self.mid) != len(self.levels) - 2 or any(len(m) != self.L for m in self.mid):
            raise ValueError("mid needs one entry per layer for each level between the lowest and highest")
        for lower, upper in zip(self.sizes, self.sizes[1:]):
            if any(hi < lo for lo, hi in zip(lower, upper)):
                raise ValueError("a layer takes fewer bytes at a higher level than at a lower one")
        if sum(self.params) <= 0:
            raise ValueError("params must count the quantized weights; they sum to zero")

    @property
    def sizes(self) -> tuple[tuple[int, ...], ...]:
        """Bytes per layer at every level, lowest first."""
        return (self.m_lo, *self.mid, self.m_hi)

    @property
    def steps(self) -> int:
        """S = levels - 1: a layer's drops from the highest level to the lowest."""
        return len(self.levels) - 1

    @property
    def n_drops(self) -> int:
        """L x S drop variables; drop i*S + k lowers layer i by its (k+1)-th step from the top.
        With two levels drop i is layer i: q_i = 1 keeps it at low precision, as the paper."""
        return self.L * self.steps

    @property
    def c(self) -> np.ndarray:
        """[L x S] bytes each drop saves."""
        S, sizes = self.steps, np.array(self.sizes, dtype=np.int64)   # [levels, L]
        return np.stack([sizes[S - k] - sizes[S - k - 1] for k in range(S)], axis=1).reshape(-1)

    @property
    def B_lo(self) -> int:
        return sum(self.m_lo)

    @property
    def B_hi(self) -> int:
        return sum(self.m_hi)

    @property
    def L(self) -> int:
        return len(self.m_lo)

    def bytes_used(self, q) -> int:
        """B_hi - sum_j c_j q_j over the drops taken (B_lo + sum_i c_i (1 - q_i) with two
        levels), in exact integer arithmetic."""
        return self.B_hi - sum(int(c) for c, qj in zip(self.c, q) if qj)

    def bits_of(self, q) -> tuple[int, ...]:
        """Each layer's precision from the drop indicators q [L x S]."""
        S = self.steps
        return tuple(self.levels[S - int(sum(q[i * S:(i + 1) * S]))] for i in range(self.L))

    def drops_of(self, bits_per_layer) -> list[int]:
        """The drop indicators q [L x S] of one precision per layer."""
        S, index = self.steps, {b: k for k, b in enumerate(self.levels)}
        if len(bits_per_layer) != self.L or not set(bits_per_layer) <= set(index):
            raise ValueError(f"need one of {self.levels} bits for each of {self.L} layers")
        return [int(k < S - index[b]) for b in bits_per_layer for k in range(S)]

    def bytes_of(self, bits_per_layer) -> int:
        return self.bytes_used(self.drops_of(bits_per_layer))

    def to_json(self) -> dict:
        out = {"m_lo": list(self.m_lo), "m_hi": list(self.m_hi), "params": list(self.params)}
        if self.levels != (LOW_BITS, HIGH_BITS):
            out["levels"], out["mid"] = list(self.levels), [list(m) for m in self.mid]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Costs":
        """The inverse of to_json (costs.json: levels and mid only when not 2 and 4)."""
        return cls(m_lo=data["m_lo"], m_hi=data["m_hi"], params=data["params"],
                   levels=data.get("levels", (LOW_BITS, HIGH_BITS)), mid=data.get("mid", ()))


def budget_bytes(costs: Costs, bits: float) -> int:
    """floor(B(b)), B(b) = B_lo + (b - lo) / (hi - lo) (B_hi - B_lo) for levels lo..hi
    (2 and 4: the paper's), with b read as the decimal written."""
    lo, hi = costs.levels[0], costs.levels[-1]
    if not lo <= bits <= hi:  # also rejects nan
        raise InvalidField("bits", f"{bits:g} is outside [{lo}, {hi}], the run's levels: choose an "
                                   f"average precision between {lo} (all {lo}-bit) and {hi} (all "
                                   f"{hi}-bit).")
    # Fraction(str(...)) makes 2.05 mean 41/20, not the binary float just below it.
    share = (Fraction(str(bits)) - lo) / (hi - lo)
    return costs.B_lo + math.floor(share * (costs.B_hi - costs.B_lo))


def low_share(costs: Costs, B: int) -> float:
    """(B_hi - B) / (B_hi - B_lo) in [0, 1]: the share of the 2-to-4-bit bytes the budget
    leaves out, about the share of layers it keeps at 2 bits."""
    span = costs.B_hi - costs.B_lo
    return 0.0 if span <= 0 else min(1.0, max(0.0, (costs.B_hi - B) / span))


@dataclass(frozen=True)
class Allocation:
    q: tuple[int, ...]               # drops taken (Costs.n_drops); two levels: 1 = layer at low precision
    bits_per_layer: tuple[int, ...]  # one of the levels per layer
    target_bits: float | None        # the b asked for; None when a byte budget was given
    budget_bytes: int
    bytes: int                       # B_lo + sum c_i (1 - q_i), the bytes actually used
    avg_bits: float                  # 8 bytes / sum(params): metadata included
    weight_bits: float               # sum(bits_i params_i) / sum(params): metadata excluded
    predicted_delta_nll: float       # Delta(q); nan for a knapsack solved without a, K
    status: str                      # SCIP's status, or "all-high" when the budget fits everything
    seconds: float                   # wall time of building and solving the model

    def to_json(self) -> dict:
        d = asdict(self)
        d["q"], d["bits_per_layer"] = list(self.q), list(self.bits_per_layer)
        if math.isnan(self.predicted_delta_nll):
            d["predicted_delta_nll"] = None  # JSON has no nan
        d["solver"] = {"status": d.pop("status"), "seconds": d.pop("seconds")}
        return d


def solve(a, K, costs: Costs, *, bits: float | None = None, budget: int | None = None,
          time_limit: float | None = None, factor=None, size=None, maximal: bool = False,
          exclude=()) -> Allocation:
    """The q minimizing Delta(q) = a.q + q.K.q within the budget (METHOD.md, "Solving").

    `factor` = (d, F) with q.K.q = d.q + |F q|^2 on binary q (QuadraticModel.factor):
    with fewer rows in F than layers, the program is written in that compact convex form
    (a few continuous variables instead of one per pair), which SCIP solves far faster
    while a run has few samples; both forms have the same optimum.

    `size` = f [n_drops + 1] adds f(sum q) to Delta (IMPQ-fit's size term, core.fit): one
    binary per number of drops, exactly one of them on, their count equal to sum q.

    `maximal`: only allocations that leave no layer able to go up a level within the
    budget (_add_maximal); IMPQ-fit's program (solve_fit).

    `exclude`: drop vectors q the answer must differ from (the next best allocations)."""
    a, K = _check_model(a, K, costs.n_drops)
    f = _check_size(size, costs.n_drops)
    B = resolve_budget(costs, bits, budget)
    start = time.perf_counter()
    model = (a, K) if f is None else (a, K, f)
    if B >= costs.B_hi:
        return _allocation([0] * costs.n_drops, costs, bits, B, model, "all-high", time.perf_counter() - start)
    q_val, status = _solve_program(a, K, costs, B, factor, time_limit, f, maximal, exclude)
    return _allocation(q_val, costs, bits, B, model, status, time.perf_counter() - start)


def _check_size(size, n_drops: int) -> np.ndarray | None:
    """The size term as an array of n_drops + 1 finite values; None when absent or all zero."""
    if size is None:
        return None
    f = np.asarray(size, dtype=np.float64)
    if f.shape != (n_drops + 1,) or not np.isfinite(f).all():
        raise ValueError(f"size has shape {f.shape} or values that are not finite; expected ({n_drops + 1},) finite")
    return f if f.any() else None


# The programs of the latest models, built once without a budget (_Programs): the
# frontier, the stability check and every move of the budget solve the same model again
# and again, and building the linearized program of 80 layers in Python takes about ten
# times as long as SCIP takes to copy it.
_PROGRAMS: OrderedDict[bytes, _Programs] = OrderedDict()
# the model of a run's samples and the ten of fewer that the app's stability check asks
# for at every budget (impq_tui.analysis.unchanged_for), with room to spare
_PROGRAMS_KEPT = 16
_programs_lock = threading.Lock()
# The form that was faster on the latest model of the same costs and kind of program that
# tried both: a new model of the same run (a sample more, or the stability check's fewer,
# which are solved once each) starts with it instead of always the first.
_FASTER: dict[bytes, int] = {}


class _Programs:
    """One model's exact programs and how long SCIP took on each. With a factor of fewer
    rows than drops: the compact form. Otherwise two linearizations with the same optimum,
    neither always the faster (several times apart, either way, on the benchmark and real runs):
    one y per pair (_linearized_program) or one z per drop (_aggregated_program). The first solve takes
    `first` (the one faster on the run's previous model, _FASTER; else one y per pair); the
    next tries the other within twice the first's time, and solves of other threads meanwhile
    wait for that trial (the frontier solves two budgets at once); later solves take the
    faster on average."""

    def __init__(self, a, K, costs: Costs, factor, compact: bool, first: int = 0,
                 size: np.ndarray | None = None) -> None:
        forms = ((lambda: _factored_program(a, factor, costs)),) if compact else (
            (lambda: _linearized_program(a, K, costs)), (lambda: _aggregated_program(a, K, costs)))
        self.forms = forms if size is None else tuple(
            (lambda form=form: _with_size(*form(), size)) for form in forms)
        self.built: dict[int, scip.Model] = {}
        self.seconds: dict[int, list[float]] = {k: [] for k in range(len(self.forms))}
        self.first = first if first < len(self.forms) else 0
        self.trying = False
        self.tried = threading.Event()      # the trial of the other form has ended

    def pick(self) -> tuple[int | None, float | None]:
        """The form for the next solve and, while the other is on trial, its time limit;
        None while another thread's trial has not ended (wait for `tried`)."""
        if len(self.forms) == 1:
            return 0, None
        first, other = self.first, 1 - self.first
        if not self.seconds[first]:
            return first, None
        if not self.seconds[other]:
            if self.trying:
                return None, None
            self.trying = True
            return other, 2 * max(self.seconds[first])
        return self.faster(), None

    def faster(self) -> int | None:
        """The form faster on average, once every form has been tried (None before)."""
        if not all(self.seconds.values()):
            return None
        return min(self.seconds, key=lambda k: sum(self.seconds[k]) / len(self.seconds[k]))

    def copy(self, form: int, costs: Costs, B: int, maximal: bool = False,
             exclude=()) -> tuple[scip.Model, list]:
        if form not in self.built:
            self.built[form] = self.forms[form]()[0]
        model = scip.Model(sourceModel=self.built[form], origcopy=True)
        model.hideOutput()
        q = model.getVars()[:costs.n_drops]   # a copy keeps the order the variables were added in
        _add_budget(model, q, costs, B)
        if maximal:
            _add_maximal(model, q, costs, B)
        for other in exclude:        # each excluded q cut off: at least one drop differs
            if len(other) != len(q):
                raise ValueError(f"an excluded allocation has {len(other)} drops, the program {len(q)}")
            model.addCons(scip.quicksum(1 - x if v else x for x, v in zip(q, other)) >= 1)
        return model, q


def _solve_program(a, K, costs: Costs, B: int, factor,
                   time_limit: float | None, size: np.ndarray | None = None,
                   maximal: bool = False, exclude=()) -> tuple[list[int], str]:
    """The optimal drops at budget B, by the model's programs (_Programs), other than
    those in `exclude`."""
    compact = factor is not None and 0 < len(factor[1]) < costs.n_drops
    h = hashlib.blake2b(repr((costs, compact, size is not None)).encode(), digest_size=16)
    kind = h.digest()
    for x in (a, K, *(factor if compact else ()), *(() if size is None else (size,))):
        h.update(np.ascontiguousarray(x, dtype=np.float64).tobytes())
    key = h.digest()
    with _programs_lock:
        programs = _PROGRAMS.get(key) or _Programs(a, K, costs, factor, compact,
                                                   first=_FASTER.get(kind, 0), size=size)
        _PROGRAMS[key] = programs
        _PROGRAMS.move_to_end(key)
        while len(_PROGRAMS) > _PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    while True:
        with _programs_lock:
            form, trial = programs.pick()
            if form is not None:
                try:
                    model, q = programs.copy(form, costs, B, maximal, exclude)
                except BaseException:
                    if trial is not None:   # the trial could not start: the first form it is
                        programs.seconds[form].append(math.inf)
                        programs.tried.set()
                    raise
                break
        programs.tried.wait()       # another thread tries the other form: its time decides
    start = time.perf_counter()
    limit = trial if time_limit is None or (trial is not None and trial < time_limit) else time_limit
    try:
        q_val, status = _optimize(model, q, costs, B, limit)
    except BaseException:
        if trial is not None:       # a trial that failed: the first form it is
            with _programs_lock:
                programs.seconds[form].append(math.inf)
            programs.tried.set()
        raise
    seconds = time.perf_counter() - start
    with _programs_lock:
        if trial is not None and status != "optimal":   # too slow on trial: never again
            programs.seconds[form].append(math.inf)
            form, model, q = None, *programs.copy(programs.first, costs, B, maximal, exclude)
        else:
            programs.seconds[form].append(seconds)
        if programs.faster() is not None:
            _FASTER[kind] = programs.faster()
    if trial is not None:
        programs.tried.set()
    if form is None:
        q_val, status = _optimize(model, q, costs, B, None if time_limit is None else
                                  max(time_limit - seconds, 0.0))
    return q_val, status


def _with_size(model: scip.Model, q: list, f: np.ndarray) -> tuple[scip.Model, list]:
    """f(sum q) added to a program's objective: z_n = 1 for exactly one n, sum q = sum n z_n.
    Added after q, so that q stays the first variables (_Programs.copy)."""
    z = [model.addVar(vtype="B", obj=float(f_n)) for f_n in f]
    model.addCons(scip.quicksum(z) == 1)
    model.addCons(scip.quicksum(q) == scip.quicksum(n * z_n for n, z_n in enumerate(z) if n))
    return model, q


def _linearized_program(a, K, costs: Costs):
    """Each product q_i q_j (i < j) as a continuous y_ij (METHOD.md); no budget yet."""
    model, q = _model_of(costs, objective=a + np.diag(K))
    for i in range(costs.n_drops):
        for j in range(i + 1, costs.n_drops):
            w = K[i, j] + K[j, i]  # q.K.q counts the pair twice
            if w == 0:
                continue
            # y_ij stands for q_i q_j. Minimizing pushes y down where w > 0 and up where
            # w < 0, so only the bound on that side is needed; the other is dropped for speed.
            y = model.addVar(lb=0.0, ub=1.0, obj=float(w))
            if w > 0:
                model.addCons(y >= q[i] + q[j] - 1)
            else:
                model.addCons(y <= q[i])
                model.addCons(y <= q[j])
    return model, q


def _aggregated_program(a, K, costs: Costs):
    """Glover's linearization: z_i stands for q_i sum_{j>i} w_ij q_j, with lo_i and hi_i
    the sums of the negative and the positive w_ij, by z_i >= lo_i q_i and
    z_i >= sum_j w_ij q_j - hi_i (1 - q_i); minimizing makes z_i the product. One z and
    two constraints per drop instead of one y per pair: a far smaller LP with a weaker
    relaxation, faster while the interactions are small next to a."""
    model, q = _model_of(costs, objective=a + np.diag(K))
    W = np.triu(K + K.T, 1)   # q.K.q counts each pair twice
    for i, row in enumerate(W):
        if not row.any():
            continue
        lo, hi = float(row[row < 0].sum()), float(row[row > 0].sum())
        z = model.addVar(lb=lo, ub=hi, obj=1.0)
        model.addCons(z >= lo * q[i])
        model.addCons(z >= scip.quicksum(float(w) * q[j] for j, w in enumerate(row) if w) - hi * (1 - q[i]))
    return model, q


def _factored_program(a, factor, costs: Costs):
    """a.q + d.q + |F q|^2: t = F q, and z >= |t|^2 as SCIP's convex quadratic constraint;
    no budget yet."""
    d, F = (np.asarray(x, dtype=np.float64) for x in factor)
    model, q = _model_of(costs, objective=a + d)
    t = []
    for row in F:
        t_k = model.addVar(lb=None, ub=None)
        model.addCons(t_k == scip.quicksum(float(f) * q_i for f, q_i in zip(row, q) if f != 0))
        t.append(t_k)
    z = model.addVar(lb=0.0, obj=1.0)
    model.addCons(scip.quicksum(t_k * t_k for t_k in t) <= z)
    return model, q


def solve_impq(D, costs, *, bits: float | None = None, budget: int | None = None,
               alpha: float = 0.5, paired: bool = False, model=None) -> Allocation:
    """IMPQ's allocation from the sample vectors D (METHOD.md): the quadratic model of D
    (or `model`, already fitted to D) solved by SCIP at the budget. `allocate`, compare
    and the app all come here."""
    model = model if model is not None else quadratic_model(D, alpha=alpha, paired=paired)
    return solve(model.a, model.K, costs, bits=bits, budget=budget, factor=model.factor)


def solve_fit(fitted, costs, *, bits: float | None = None, budget: int | None = None,
              exclude=()) -> Allocation:
    """IMPQ-fit's allocation (our extension): the model fitted to the visited states
    (core.fit.FittedModel), solved by the same SCIP program under the same budget, its
    size term as one binary per number of drops. The program gets the interactions
    centred (a common shift c of every w_ij is c n(n-1)/2, moved into the size term: the
    same objective on every q): on a real 30-layer run SCIP took up to 4x as long with the
    w_ij as fitted (f(2) = 0). The allocation reports the fitted model's own prediction.

    Only allocations that spend the budget: none leaves a layer that could go up a level
    within it (solve's `maximal`). The fitted model is not monotone: away from the states
    the walks visit, its interactions can sum to a gain from lowering a layer, and the
    optimum of an unconstrained program exploits exactly that. On a 100-sample GPTQ run of
    the embedded model it chose 11 low layers at 3.5 bits, where the budget holds 8, with a
    predicted loss below all-high's (-0.44 nats) and a real perplexity 2.7x the best
    baseline's. What the walks measure rises as layers go low: the mean over the visited
    states of each size rises with the size on the GPTQ and GGUF runs, and on the HQQ and
    quanto runs up to 26 of 30 low layers (then dips of at most 0.13 nats, where a collapsed
    model's loss saturates, and one of 0.004)."""
    W, f = np.asarray(fitted.W, dtype=np.float64), np.asarray(fitted.f, dtype=np.float64)
    L = len(W)
    if L < 2 or not f.any():
        return solve(fitted.a, fitted.K, costs, bits=bits, budget=budget, size=f, maximal=True,
                     exclude=exclude)
    c = W[np.triu_indices(L, 1)].mean()
    n = np.arange(L + 1)
    centred = W - c * (1 - np.eye(L))
    return solve(fitted.a, centred / 2, costs, bits=bits, budget=budget,
                 size=f + c * n * (n - 1) / 2, maximal=True, exclude=exclude)


def local_model(D, perms, costs: Costs, *, bits: float | None = None, budget: int | None = None,
                alpha: float = 0.5):
    """IMPQ-local's quadratic model (our extension) at a budget: weighted toward the
    budget's number of low-precision layers (drops, with more levels)."""
    share = low_share(costs, resolve_budget(costs, bits, budget))
    return budget_local_model(D, perms, share, alpha=alpha)


def solve_local(D, perms, costs: Costs, *, bits: float | None = None, budget: int | None = None,
                alpha: float = 0.5) -> Allocation:
    """IMPQ-local's allocation, solved by SCIP under the same budget as IMPQ."""
    model = local_model(D, perms, costs, bits=bits, budget=budget, alpha=alpha)
    return solve(model.a, model.K, costs, bits=bits, budget=budget)


def solve_knapsack(scores, costs: Costs, *, bits: float | None = None, budget: int | None = None,
                   a=None, K=None, time_limit: float | None = None) -> Allocation:
    """A baseline: raise the layers of highest score s_i to 4-bit, max sum s_i (1 - q_i).

    With more levels it is a multiple-choice knapsack (one level per layer): layer i at
    level b keeps s_i g(b) of its score, g(b) = (1 - 4^-(b - lo)) / (1 - 4^-(hi - lo)), the
    share of the lowest level's squared rounding error that b bits remove (a uniform
    quantizer's error falls 4x per bit); so 3 of 2/3/4 bits keeps 80% of a score. With
    two levels g is 0 and 1: the knapsack above."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (costs.L,):
        raise ValueError(f"scores has shape {s.shape}, expected ({costs.L},)")
    aK = None if a is None or K is None else _check_model(a, K, costs.n_drops)
    B = resolve_budget(costs, bits, budget)
    start = time.perf_counter()
    if B >= costs.B_hi:
        return _allocation([0] * costs.n_drops, costs, bits, B, aK, "all-high", time.perf_counter() - start)
    # max sum s_i (1 - q_i) = sum s_i - min sum s_i q_i
    model, q = _model_with_budget(costs, B, objective=np.repeat(s, costs.steps) * _step_values(costs))
    q_val, status = _optimize(model, q, costs, B, time_limit)
    return _allocation(q_val, costs, bits, B, aK, status, time.perf_counter() - start)


FRONTIER_GRID = tuple(round(2 + 0.05 * k, 2) for k in range(41))   # 2.00, 2.05, ..., 4.00


def frontier(a, K, costs: Costs, bits_grid=FRONTIER_GRID, *, factor=None,
             cancelled: Callable[[], bool] = lambda: False,
             workers: int | None = None) -> list[Allocation] | None:
    """IMPQ allocations over a grid of target bits, solved `workers` at a time (SCIP
    releases the GIL while it optimizes: threads run in parallel; default one per core);
    None when `cancelled` says so (checked before each solve starts)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(b: float) -> Allocation | None:
        return None if cancelled() else solve(a, K, costs, bits=float(b), factor=factor)

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        out = list(pool.map(one, bits_grid))
    return None if any(x is None for x in out) else out


def _check_model(a, K, L: int) -> tuple[np.ndarray, np.ndarray]:
    a, K = np.asarray(a, dtype=np.float64), np.asarray(K, dtype=np.float64)
    if a.shape != (L,) or K.shape != (L, L):
        raise ValueError(f"a and K have shapes {a.shape} and {K.shape}, expected ({L},) and ({L}, {L})")
    if not (np.isfinite(a).all() and np.isfinite(K).all()):
        raise ValueError("a and K must be finite")
    return a, K


def resolve_budget(costs: Costs, bits: float | None, budget: int | None) -> int:
    """The budget in bytes from a target in bits or a byte count (exactly one of them)."""
    if (bits is None) == (budget is None):
        raise UserError("Give either a target in bits per weight or a budget in bytes, not both or neither.")
    B = budget_bytes(costs, bits) if budget is None else int(budget)
    if B < costs.B_lo:
        raise UserError(f"The budget of {B:,} bytes is below {costs.B_lo:,} bytes, the size with every "
                        "layer at 2 bits: no allocation fits. Raise the budget to at least that.")
    return B


def level_value(costs: Costs, bits: float) -> float:
    """g(b) of solve_knapsack: 0 at the lowest level, 1 at the highest."""
    lo, hi = costs.levels[0], costs.levels[-1]
    return (1 - 4.0 ** -(bits - lo)) / (1 - 4.0 ** -(hi - lo))


def _step_values(costs: Costs) -> np.ndarray:
    """[L x S] the share of a baseline score each drop gives up (1 with two levels)."""
    lv, S = costs.levels, costs.steps
    per_step = [level_value(costs, lv[S - k]) - level_value(costs, lv[S - k - 1]) for k in range(S)]
    return np.tile(per_step, costs.L)


def _model_with_budget(costs: Costs, B: int, objective) -> tuple[scip.Model, list]:
    """A minimization over binary drops q with objective coefficients `objective`, the budget,
    and with more than two levels each layer's steps in order: q[i, k+1] <= q[i, k]."""
    model, q = _model_of(costs, objective)
    _add_budget(model, q, costs, B)
    return model, q


def _model_of(costs: Costs, objective) -> tuple[scip.Model, list]:
    """_model_with_budget without the budget."""
    model = scip.Model()
    model.hideOutput()
    q = [model.addVar(vtype="B", obj=float(o)) for o in objective]
    S = costs.steps
    for i in range(costs.L):
        for k in range(S - 1):
            model.addCons(q[i * S + k + 1] <= q[i * S + k])
    return model, q


def _scaled_savings(q: list, costs: Costs):
    """(sum c_j q_j / scale, scale): the bytes the drops save, divided through by max c.
    With raw byte counts (1e8 next to objective coefficients of 1e-2) SCIP's presolve has
    declared solutions "optimal" that were 1e-3 worse than a feasible one."""
    scale = int(costs.c.max())
    return scip.quicksum(float(c_i / scale) * q_i for c_i, q_i in zip(costs.c, q) if c_i), scale


def _add_budget(model: scip.Model, q: list, costs: Costs, B: int) -> None:
    # B_lo + sum c_i (1 - q_i) <= B  <=>  sum c_i q_i >= B_hi - B
    saved, scale = _scaled_savings(q, costs)
    model.addCons(saved >= (costs.B_hi - B) / scale)


def _add_maximal(model: scip.Model, q: list, costs: Costs, B: int) -> None:
    """Every layer's last drop taken (q[i, k] = 1, q[i, k + 1] = 0) would not fit back:
    bytes used + c[i, k] > B. As bytes used + c_j >= (B + 1) (q_j - q_next): trivial where
    drop j is not the last one taken. Scaled as _add_budget. Such allocations always exist
    (undo last drops that fit until none does)."""
    saved, scale = _scaled_savings(q, costs)
    S, c = costs.steps, costs.c
    for j in range(costs.n_drops):
        last = q[j] - q[j + 1] if (j + 1) % S else q[j]
        model.addCons((costs.B_hi + int(c[j])) / scale - saved >= (B + 1) / scale * last)


def _optimize(model: scip.Model, q: list, costs: Costs, B: int,
              time_limit: float | None) -> tuple[list[int], str]:
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    for _ in range(_MAX_CUTS):
        if deadline is not None:
            model.setParam("limits/time", max(deadline - time.perf_counter(), 0.0))
        model.optimizeNogil()   # releases the GIL: the app stays responsive while SCIP works
        if model.getNSols() == 0:  # only when stopped early: all-low always fits
            return [1] * costs.n_drops, model.getStatus()
        q_val = [round(model.getVal(x)) for x in q]
        if costs.bytes_used(q_val) <= B:
            return q_val, model.getStatus()
        # Over by a tolerance's worth of bytes: forbid exactly this q and solve again.
        model.freeTransform()
        model.addCons(scip.quicksum(1 - x if v else x for x, v in zip(q, q_val)) >= 1)
    raise RuntimeError(f"SCIP kept returning allocations over the budget of {B} bytes")


def _allocation(q, costs: Costs, bits, B: int, aK, status: str, seconds: float) -> Allocation:
    q = tuple(int(v) for v in q)
    bits_per_layer = costs.bits_of(q)
    used, n_params = costs.bytes_used(q), sum(costs.params)
    return Allocation(
        q=q, bits_per_layer=bits_per_layer, target_bits=None if bits is None else float(bits),
        budget_bytes=B, bytes=used,
        avg_bits=8 * used / n_params,
        weight_bits=sum(b * p for b, p in zip(bits_per_layer, costs.params)) / n_params,
        predicted_delta_nll=math.nan if aK is None else predicted_delta(aK, q),
        status=status, seconds=seconds)
