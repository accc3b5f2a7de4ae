"""What the dashboard shows, computed from a run's samples: no Textual here, so the app's
solver process (impq_tui.solver_process) calls these and the tests can check them against
the engine directly.

    fit(D, paired)                       the quadratic model and how its estimates settled
    Allocations(costs).get(D, bits)      the allocation at a budget (SCIP), as `impq-tui solve`,
                                         by IMPQ or one of our extensions (method=)
    unchanged_for(D, allocations, bits)  how many of the last samples left that allocation alone
    frontier_points(D, allocations)      predicted loss increase over the run's whole bits range
                                         (2..4 for the paper's levels; frontier_grid)
    FitProcess(D, P).result()            IMPQ-fit's model (core.fit), fitted in a child process
    diverging_colors(K), legend_colors() K's cells and colour scale (matplotlib: imported
                                         by the solver process, never on the event loop)

The allocation model is one of core.results.RUN_METHODS: IMPQ (the paper's, the default),
IMPQ-local and IMPQ-fit (our extensions, labelled so wherever they are shown).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from core.fit import FittedModel, walk_losses
from core.interactions import QuadraticModel, quadratic_model
from core.requests import BITS_MAX, BITS_MIN
from core.results import IMPQ, IMPQ_FIT, IMPQ_LOCAL, LABELS, RUN_METHODS
from core.solver import (
    FRONTIER_GRID,
    Allocation,
    Costs,
    local_model,
    solve_fit,
    solve_impq,
    solve_local,
)
from impq_tui.report import fmt_bytes  # noqa: F401  (screens/dashboard.py reads analysis.fmt_bytes)

STABILITY_WINDOW = 10          # samples looked back over for "allocation unchanged"
COARSE_STEPS = (0.5, 0.25, 0.1, 0.05)   # the frontier's budgets, drawn coarse to fine
NOISY_SE = 1.0                 # max se/|φ| above this: the estimates are still noise
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MODELS = RUN_METHODS           # the allocation models the dashboard offers, in key order
EXTENSION = "our extension"    # how IMPQ-local and IMPQ-fit are labelled wherever shown


def model_label(method: str, short: bool = False) -> str:
    """How an allocation model is named on screen: "IMPQ (paper)" or "IMPQ-fit (our
    extension)", as the README's tables name them; short: the name alone (core.results.LABELS)."""
    if short:
        return LABELS[method]
    return f"{LABELS[method]} ({'paper' if method == IMPQ else EXTENSION})"


def next_model(method: str) -> str:
    """The model after `method` in MODELS, round again after the last."""
    return MODELS[(MODELS.index(method) + 1) % len(MODELS)] if method in MODELS else IMPQ


@dataclass(frozen=True)
class Fit:
    """The quadratic model of M samples and the settle curve: after each m = 2..M samples,
    the largest standard error relative to its estimate (see `relative_se`).

    With more than two levels the model's entries are drops (layer i's step k is entry
    i*S + k, k = 0 the step down from the highest level); `layer` sums each layer's steps:
    its whole drop from the highest level to the lowest (layer_terms). With two levels
    `layer` is the model's own phi, se and K."""
    model: QuadraticModel
    settle_m: tuple[int, ...]
    settle: tuple[float, ...]
    paired: bool
    steps: int = 1                       # S = levels - 1
    layer: LayerTerms | None = None      # per layer; None: the model's own (two levels)

    @property
    def samples(self) -> int:
        return self.model.samples

    @property
    def layer_phi(self) -> np.ndarray:
        return self.model.phi if self.layer is None else self.layer.phi

    @property
    def layer_se(self) -> np.ndarray:
        return self.model.se if self.layer is None else self.layer.se

    @property
    def layer_K(self) -> np.ndarray:
        return self.model.K if self.layer is None else self.layer.K


@dataclass(frozen=True)
class LayerTerms:
    """Per layer, its steps summed: phi (the mean of the per-sample row sums
    D[:, i*S:(i+1)*S].sum(1)), se of that mean from those row sums (the steps of one
    layer are correlated, so their variances do not add), and K summed over both
    layers' steps (the model's q.K.q term of two layers taken all the way down)."""
    phi: np.ndarray
    se: np.ndarray
    K: np.ndarray


def layer_terms(D: np.ndarray, model: QuadraticModel, steps: int, paired: bool = False,
                alpha: float = 0.5) -> LayerTerms:
    M, n = D.shape
    L = n // steps
    sums = quadratic_model(D.reshape(M, L, steps).sum(axis=2), alpha=alpha, paired=paired)
    K = model.K.reshape(L, steps, L, steps).sum(axis=(1, 3))
    return LayerTerms(phi=sums.phi, se=sums.se, K=K)


def relative_se(model: QuadraticModel) -> float:
    """max_i se_i / |phi_i|, with |phi_i| floored at a tenth of the mean |phi| so that a
    layer whose estimate is near zero does not make the figure meaningless."""
    mag = np.abs(model.phi)
    floor = max(0.1 * float(mag.mean()), 1e-12)
    return float(np.max(model.se / np.maximum(mag, floor)))


def fit(D: np.ndarray, paired: bool = False, alpha: float = 0.5, steps: int = 1) -> Fit:
    """steps: S = levels - 1 of the run (D has L x S columns)."""
    D = np.asarray(D, dtype=np.float64)
    model = quadratic_model(D, alpha=alpha, paired=paired)
    first = 4 if paired else 2          # se needs two independent draws
    ms = tuple(range(first, len(D) + 1))
    settle = tuple(_relative_se_of(D[:m], paired) for m in ms)
    layer = layer_terms(D, model, steps, paired, alpha) if steps > 1 else None
    return Fit(model=model, settle_m=ms, settle=settle, paired=paired, steps=steps, layer=layer)


def _relative_se_of(D: np.ndarray, paired: bool) -> float:
    """relative_se of quadratic_model(D, paired=paired) from its phi and se alone: the
    settle curve asks for one per sample count, and needs neither C nor K nor a."""
    M, L = D.shape
    phi = D.mean(axis=0)
    draws = D[: M - M % 2].reshape(-1, 2, L).mean(axis=1) if paired else D
    n = draws.shape[0]
    X = draws - draws.mean(axis=0)
    se = np.sqrt((X * X).sum(axis=0) / (n - 1) / n)
    mag = np.abs(phi)
    floor = max(0.1 * float(mag.mean()), 1e-12)
    return float(np.max(se / np.maximum(mag, floor)))


def _digest(*arrays: np.ndarray | None) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is not None:
            h.update(repr(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


class Allocations:
    """Allocations of a run by (model, samples, budget), each solved by SCIP once.

    Every new sample needs the allocation at the current budget, and "unchanged for the
    last k samples" and the frontier ask again for ones solved before; the cache makes
    those free. Keys hash the samples themselves (and their permutations, which
    IMPQ-local and IMPQ-fit use), so rows arriving out of order (several writers) can
    never return a stale answer. Worker threads share it.

    method: IMPQ (the paper's model of D), IMPQ-local (the model of D and its walks
    `perms` weighted toward the budget) or IMPQ-fit (`fitted`, the model core.fit fitted to
    the states of D's walks), solved as core.evaluate.allocate solves each."""

    def __init__(self, costs: Costs, paired: bool = False, alpha: float = 0.5) -> None:
        self.costs, self.paired, self.alpha = costs, paired, alpha
        self._cache: dict[tuple, Allocation] = {}
        self._lock = threading.Lock()

    def get(self, D: np.ndarray, bits: float, model: QuadraticModel | None = None, *,
            method: str = IMPQ, perms: np.ndarray | None = None,
            fitted: FittedModel | None = None) -> Allocation:
        if method not in MODELS:
            raise ValueError(f"unknown allocation model {method!r}")
        if method != IMPQ and perms is None:
            raise ValueError(f"{LABELS[method]} needs the samples' permutations")
        if method == IMPQ_FIT and fitted is None:
            raise ValueError("IMPQ-fit needs the fitted model (FitProcess)")
        key = (method, _digest(D, None if method == IMPQ else perms), round(bits, 2))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        if method == IMPQ:
            allocation = solve_impq(D, self.costs, bits=bits, alpha=self.alpha,
                                    paired=self.paired, model=model)
        elif method == IMPQ_LOCAL:
            allocation = solve_local(D, perms, self.costs, bits=bits, alpha=self.alpha)
        else:
            allocation = solve_fit(fitted, self.costs, bits=bits)
        with self._lock:
            self._cache[key] = allocation
        return allocation

    def local_model(self, D: np.ndarray, perms: np.ndarray, bits: float) -> QuadraticModel:
        """IMPQ-local's model at `bits` (core.solver.solve_local's)."""
        return local_model(D, perms, self.costs, bits=bits, alpha=self.alpha)


def unchanged_for(D: np.ndarray, allocations: Allocations, bits: float, *,
                  window: int = STABILITY_WINDOW, method: str = IMPQ,
                  perms: np.ndarray | None = None,
                  cancelled: Callable[[], bool] = lambda: False) -> int | None:
    """How many of the last samples (up to `window`) left the allocation at `bits` as it is
    now: k means the allocations from M-k, ..., M samples are all the same. None when
    cancelled or fewer than two samples exist, and for IMPQ-fit, which would have to be
    fitted again for every count of samples."""
    M = len(D)
    if M < 2 or method == IMPQ_FIT:
        return None

    def q(m: int):
        P = perms[:m] if perms is not None else None
        return allocations.get(D[:m], bits, method=method, perms=P).q

    current = q(M)
    k = 0
    for m in range(M - 1, max(M - 1 - window, 0), -1):
        if cancelled():
            return None
        if q(m) != current:
            break
        k += 1
    return k


@dataclass(frozen=True)
class FrontierPoint:
    bits: float                  # target average bits b
    avg_bits: float              # effective bits per weight with metadata
    predicted: float             # Delta(q) of the optimal q at b
    high_layers: int             # layers at the highest level (4 bits for the paper's)


def bits_range(levels=(2, 4)) -> tuple[float, float]:
    """The budgets a run's levels allow: all at the lowest .. all at the highest."""
    return float(min(levels)), float(max(levels))


def frontier_grid(levels=(2, 4)) -> tuple[float, ...]:
    """The frontier's budgets: every 0.05 bits over the levels' range (core.solver's
    FRONTIER_GRID, 2.00 .. 4.00, for the paper's)."""
    lo, hi = bits_range(levels)
    if (lo, hi) == (2.0, 4.0):
        return FRONTIER_GRID
    return tuple(round(lo + 0.05 * k, 2) for k in range(round((hi - lo) / 0.05) + 1))


def frontier_order(grid=FRONTIER_GRID) -> list[float]:
    """The grid's budgets coarse to fine: those on whole half bits first (2.0, 2.5, ...,
    4.0), then quarter bits, tenths, and the rest, so a partial frontier spans the range."""
    order: list[float] = []
    for step in COARSE_STEPS:
        order += [b for b in grid if b not in order and math.isclose(b / step, round(b / step))]
    return order + [b for b in grid if b not in order]


def frontier_progress(D: np.ndarray, allocations: Allocations, grid=None, *,
                      method: str = IMPQ, perms: np.ndarray | None = None,
                      fitted: FittedModel | None = None,
                      cancelled: Callable[[], bool] = lambda: False, every_s: float = 0.25,
                      workers: int = 1) -> Iterator[tuple[list[FrontierPoint], bool]]:
    """The frontier of D by `method` (Allocations.get) solved budget by budget, coarse ones
    first (frontier_order): yields (the points solved so far in order of bits, complete)
    once the half bits are solved, then at most every `every_s`, and last with every point
    (complete True). Each budget is solved as core.solver.frontier solves it (IMPQ-local:
    with the model of that budget), through the cache of `allocations`, `workers` at a
    time (SCIP releases the GIL while it optimizes), taken in that order; stops without a
    last yield once `cancelled()` says so. grid: the run's (frontier_grid of its levels)
    unless given."""
    from concurrent.futures import ThreadPoolExecutor

    grid = frontier_grid(allocations.costs.levels) if grid is None else grid
    top = allocations.costs.levels[-1]
    model = (quadratic_model(D, alpha=allocations.alpha, paired=allocations.paired)
             if method == IMPQ else None)
    order = frontier_order(grid)
    first = sum(1 for b in order if math.isclose(b / COARSE_STEPS[0], round(b / COARSE_STEPS[0])))

    def one(b: float) -> Allocation | None:
        if cancelled():
            return None
        return allocations.get(D, b, model, method=method, perms=perms, fitted=fitted)

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    solved = pool.map(one, order) if pool is not None else map(one, order)
    points: dict[float, FrontierPoint] = {}
    shown = time.monotonic()
    try:
        for k, (b, alloc) in enumerate(zip(order, solved), 1):
            if alloc is None or cancelled():
                return
            points[b] = FrontierPoint(bits=float(b), avg_bits=alloc.avg_bits,
                                      predicted=alloc.predicted_delta_nll,
                                      high_layers=sum(x == top for x in alloc.bits_per_layer))
            if k == len(order) or k == first or (k > first and time.monotonic() - shown >= every_s):
                shown = time.monotonic()
                yield [points[x] for x in sorted(points)], k == len(order)
    finally:
        if pool is not None:        # budgets not started yet are dropped, not solved
            pool.shutdown(wait=False, cancel_futures=True)


def frontier_points(D: np.ndarray, allocations: Allocations, grid=None,
                    cancelled: Callable[[], bool] = lambda: False, **model) -> list[FrontierPoint] | None:
    """The whole frontier, as points to plot (None when cancelled); model: method=,
    perms=, fitted= as frontier_progress takes them."""
    for points, complete in frontier_progress(D, allocations, grid, cancelled=cancelled, **model):
        if complete:
            return points
    return None


# ------------------------------------------------------------------ IMPQ-fit off the app

# The child: D and P in (an .npz on stdin), the FittedModel out (an .npz on stdout), or
# core.fit's refusal (a UserError: too few samples) on stderr with exit status 3.
FIT_CHILD = """
import io, os, sys
import numpy as np
try:
    os.nice(10)
except OSError:
    pass
from core.errors import UserError
from core.fit import fit_states
data = np.load(io.BytesIO(sys.stdin.buffer.read()))
try:
    f = fit_states(data["D"], data["P"])
except UserError as e:
    sys.stderr.write(str(e))
    sys.exit(3)
out = io.BytesIO()
np.savez(out, u=f.u, W=f.W, f=f.f, lam=f.lam, cv_rmse=f.cv_rmse, samples=f.samples, states=f.states)
sys.stdout.buffer.write(out.getvalue())
"""
REFUSED = 3


@dataclass(frozen=True)
class FitResult:
    """IMPQ-fit's model of the samples D (their walks P), or why core.fit gave none."""
    D: np.ndarray
    P: np.ndarray
    model: FittedModel | None
    error: str | None          # core.fit's refusal, as it words it
    seconds: float

    @property
    def samples(self) -> int:
        return len(self.D)


class FitProcess:
    """core.fit.fit_states of (D, P) in a child process of its own, at a lower priority.
    The fit is numpy work of a second for 30 layers and minutes for 80 on 2 cores: in a
    thread it could not be stopped once stale, and its Python parts would take the app's
    GIL. A child is killed at once (`kill`, or `cancelled()` while `result` waits)."""

    def __init__(self, D: np.ndarray, P: np.ndarray) -> None:
        self.D = np.asarray(D, dtype=np.float64)
        self.P = np.asarray(P, dtype=np.int64)
        self._process: subprocess.Popen | None = None
        self._killed = False
        self._lock = threading.Lock()

    def result(self, cancelled: Callable[[], bool] = lambda: False,
               poll_s: float = 0.1) -> FitResult | None:
        """Fit, waiting for the child (call it off the event loop); None when cancelled."""
        import core

        start = time.perf_counter()
        data = io.BytesIO()
        np.savez(data, D=self.D, P=self.P)
        root = os.path.dirname(os.path.dirname(os.path.abspath(core.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with self._lock:
            if self._killed:
                return None
            self._process = subprocess.Popen(
                [sys.executable, "-c", FIT_CHILD], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        payload: bytes | None = data.getvalue()
        while True:
            try:
                out, err = self._process.communicate(payload, timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                payload = None       # sent once; communicate keeps what it has read
                if cancelled():
                    self.kill()
                    return None
            except (BrokenPipeError, ValueError):   # killed while the input went in
                self._process.wait()
                return None
        if self._killed or cancelled():
            return None
        code = self._process.returncode
        seconds = time.perf_counter() - start
        if code == REFUSED:
            return FitResult(self.D, self.P, None, err.decode(errors="replace").strip(), seconds)
        if code != 0:
            said = err.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"the IMPQ-fit process ended with exit status {code}"
                               + (f": {said[-1]}" if said else ""))
        f = np.load(io.BytesIO(out))
        model = FittedModel(u=f["u"], W=f["W"], f=f["f"], lam=float(f["lam"]),
                            cv_rmse=float(f["cv_rmse"]), samples=int(f["samples"]),
                            states=int(f["states"]))
        return FitResult(self.D, self.P, model, None, seconds)

    def kill(self) -> None:
        """Stop the child now (from any thread); `result` then answers None."""
        with self._lock:
            self._killed = True
            process = self._process
        if process is not None and process.poll() is None:
            try:
                process.kill()
            except OSError:
                pass


def noise_note(fit: Fit, allocation: Allocation | None = None) -> str | None:
    """Why the estimates are still noise, or None when they are not: no standard error
    yet, standard errors above NOISY_SE times the estimates (relative_se), or a negative
    predicted loss increase within two standard errors of zero (a real one, outside
    them, is a model that quantization helps: random weights do that)."""
    model = fit.model
    draws = model.samples // 2 if fit.paired else model.samples
    if draws < 2:
        return f"{fit.samples} sample{'s' if fit.samples != 1 else ''}: no standard errors yet"
    if fit.settle and fit.settle[-1] > NOISY_SE:
        return f"standard errors up to {fit.settle[-1]:.1f}× the estimates"
    if allocation is not None and allocation.predicted_delta_nll < 0:
        q = np.asarray(allocation.q, dtype=np.float64)
        se = math.sqrt(max(float(q @ model.C @ q), 0.0) / draws)
        if -allocation.predicted_delta_nll < 2 * se:
            return "a negative predicted loss increase, within two standard errors of zero"
    return None


def extrapolation_note(D, P, allocation: Allocation | None) -> str | None:
    """For IMPQ-fit: a note when its allocation's predicted loss increase is negative, less
    loss than all-high, and below that of every state the walks measured with as many
    drops (low layers, with two levels): the fitted model's extrapolation, not something
    SPQE saw. Below the measured states alone is no sign (an optimum is expected to beat
    what ~100 random states of its size gave); None otherwise."""
    D, P = np.asarray(D, dtype=np.float64), np.asarray(P)
    if allocation is None or D.ndim != 2 or D.shape != P.shape or not len(D):
        return None
    k = int(sum(allocation.q))
    if not 0 < k <= D.shape[1] or allocation.predicted_delta_nll >= 0:
        return None
    least = float(walk_losses(D, P)[:, k].min())
    if allocation.predicted_delta_nll >= least:
        return None
    return (f"Δloss below all-high, unlike every measured state of its size (least "
            f"{least:+.2f}): extrapolated")


def full_precision_bytes(costs: Costs, dtype: str) -> int:
    """Bytes of the quantized layers' weights at the run's full precision."""
    return sum(costs.params) * DTYPE_BYTES.get(dtype, 4)


def clamp_bits(bits: float, levels=(BITS_MIN, BITS_MAX)) -> float:
    """bits within the range of `levels` (2..4, the paper's, unless given)."""
    lo, hi = bits_range(levels)
    return round(min(hi, max(lo, bits)), 2)


def top_interactions(K: np.ndarray, n: int = 3) -> list[tuple[int, int, float]]:
    """The n largest off-diagonal |K_ij| (i < j), strongest first."""
    L = K.shape[0]
    pairs = [(i, j, float(K[i, j])) for i in range(L) for j in range(i + 1, L)]
    pairs.sort(key=lambda p: -abs(p[2]))
    return pairs[:n]


# ------------------------------------------------------------------ K's colours

def interaction_scale(K: np.ndarray) -> float:
    """The largest off-diagonal |K_ij|: the colour scale's end. The diagonal holds the
    variances, usually larger; it saturates rather than washing the pairs out."""
    off = np.abs(K - np.diag(np.diag(K)))
    return float(off.max()) if K.shape[0] > 1 and off.max() > 0 else float(np.max(np.abs(K))) or 1.0


def diverging_colors(K: np.ndarray, scale: float | None = None) -> list[list[tuple[int, int, int]]]:
    """RGB per cell from matplotlib's RdBu colormap, symmetric around zero, so that sign
    and size read at a glance (and stay distinct at 256 colours)."""
    from matplotlib import colormaps

    scale = scale or interaction_scale(K)
    rgba = colormaps["RdBu_r"](np.clip((K / scale + 1) / 2, 0, 1))
    return [[tuple(int(255 * c) for c in cell[:3]) for cell in row] for row in rgba]


def legend_colors(steps: int = 11) -> list[tuple[int, int, int]]:
    """The colour scale's strip: `steps` colours from -s through 0 to +s (the same for
    every K, its ends being K's own scale)."""
    return diverging_colors(np.linspace(-1.0, 1.0, steps).reshape(1, -1), 1.0)[0]
