"""What the dashboard shows, computed from a run's samples: no Textual here, so the app's
worker threads call these and the tests can check them against the engine directly.

    fit(D, paired)                       the quadratic model and how its estimates settled
    Allocations(costs).get(D, bits)      the IMPQ allocation at a budget (SCIP), as `impq-tui solve`
    unchanged_for(D, allocations, bits)  how many of the last samples left that allocation alone
    frontier_points(D, allocations)      predicted loss increase over the whole 2..4 bits range
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from core.interactions import QuadraticModel, quadratic_model
from core.requests import BITS_MAX, BITS_MIN
from core.solver import FRONTIER_GRID, Allocation, Costs, solve_impq
from impq_tui.report import fmt_bytes  # noqa: F401  (screens/dashboard.py reads analysis.fmt_bytes)

STABILITY_WINDOW = 10          # samples looked back over for "allocation unchanged"
COARSE_STEPS = (0.5, 0.25, 0.1, 0.05)   # the frontier's budgets, drawn coarse to fine
NOISY_SE = 1.0                 # max se/|φ| above this: the estimates are still noise
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Fit:
    """The quadratic model of M samples and the settle curve: after each m = 2..M samples,
    the largest standard error relative to its estimate (see `relative_se`)."""
    model: QuadraticModel
    settle_m: tuple[int, ...]
    settle: tuple[float, ...]
    paired: bool

    @property
    def samples(self) -> int:
        return self.model.samples


def relative_se(model: QuadraticModel) -> float:
    """max_i se_i / |phi_i|, with |phi_i| floored at a tenth of the mean |phi| so that a
    layer whose estimate is near zero does not make the figure meaningless."""
    mag = np.abs(model.phi)
    floor = max(0.1 * float(mag.mean()), 1e-12)
    return float(np.max(model.se / np.maximum(mag, floor)))


def fit(D: np.ndarray, paired: bool = False, alpha: float = 0.5) -> Fit:
    D = np.asarray(D, dtype=np.float64)
    model = quadratic_model(D, alpha=alpha, paired=paired)
    first = 4 if paired else 2          # se needs two independent draws
    ms = tuple(range(first, len(D) + 1))
    settle = tuple(relative_se(quadratic_model(D[:m], alpha=alpha, paired=paired)) for m in ms)
    return Fit(model=model, settle_m=ms, settle=settle, paired=paired)


class Allocations:
    """IMPQ allocations of a run by (samples, budget), each solved by SCIP once.

    Every new sample needs the allocation at the current budget, and "unchanged for the
    last k samples" and the frontier ask again for ones solved before; the cache makes
    those free. Keys hash the samples themselves, so rows arriving out of order (several
    writers) can never return a stale answer. Worker threads share it."""

    def __init__(self, costs: Costs, paired: bool = False, alpha: float = 0.5) -> None:
        self.costs, self.paired, self.alpha = costs, paired, alpha
        self._cache: dict[tuple, Allocation] = {}
        self._lock = threading.Lock()

    def get(self, D: np.ndarray, bits: float, model: QuadraticModel | None = None) -> Allocation:
        key = (hashlib.blake2b(np.ascontiguousarray(D).tobytes(), digest_size=16).digest(),
               D.shape, round(bits, 2))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        allocation = solve_impq(D, self.costs, bits=bits, alpha=self.alpha, paired=self.paired,
                                model=model)
        with self._lock:
            self._cache[key] = allocation
        return allocation


def unchanged_for(D: np.ndarray, allocations: Allocations, bits: float, *,
                  window: int = STABILITY_WINDOW,
                  cancelled: Callable[[], bool] = lambda: False) -> int | None:
    """How many of the last samples (up to `window`) left the allocation at `bits` as it is
    now: k means the allocations from M-k, ..., M samples are all the same. None when
    cancelled or fewer than two samples exist."""
    M = len(D)
    if M < 2:
        return None
    current = allocations.get(D, bits).q
    k = 0
    for m in range(M - 1, max(M - 1 - window, 0), -1):
        if cancelled():
            return None
        if allocations.get(D[:m], bits).q != current:
            break
        k += 1
    return k


@dataclass(frozen=True)
class FrontierPoint:
    bits: float                  # target average bits b
    avg_bits: float              # effective bits per weight with metadata
    predicted: float             # Delta(q) of the optimal q at b
    high_layers: int             # layers at 4 bits


def frontier_order(grid=FRONTIER_GRID) -> list[float]:
    """The grid's budgets coarse to fine: those on whole half bits first (2.0, 2.5, ...,
    4.0), then quarter bits, tenths, and the rest, so a partial frontier spans the range."""
    order: list[float] = []
    for step in COARSE_STEPS:
        order += [b for b in grid if b not in order and math.isclose(b / step, round(b / step))]
    return order + [b for b in grid if b not in order]


def frontier_progress(D: np.ndarray, allocations: Allocations, grid=FRONTIER_GRID, *,
                      cancelled: Callable[[], bool] = lambda: False, every_s: float = 0.25
                      ) -> Iterator[tuple[list[FrontierPoint], bool]]:
    """The IMPQ frontier of D solved budget by budget, coarse ones first (frontier_order):
    yields (the points solved so far in order of bits, complete) once the half bits are
    solved, then at most every `every_s`, and last with every point (complete True).
    Each budget is solved as core.solver.frontier solves it, through the cache of
    `allocations`; stops without a last yield once `cancelled()` says so."""
    model = quadratic_model(D, alpha=allocations.alpha, paired=allocations.paired)
    order = frontier_order(grid)
    first = sum(1 for b in order if math.isclose(b / COARSE_STEPS[0], round(b / COARSE_STEPS[0])))
    points: dict[float, FrontierPoint] = {}
    shown = time.monotonic()
    for k, b in enumerate(order, 1):
        if cancelled():
            return
        alloc = allocations.get(D, b, model)
        points[b] = FrontierPoint(bits=float(b), avg_bits=alloc.avg_bits,
                                  predicted=alloc.predicted_delta_nll,
                                  high_layers=sum(x == 4 for x in alloc.bits_per_layer))
        if k == len(order) or k == first or (k > first and time.monotonic() - shown >= every_s):
            shown = time.monotonic()
            yield [points[x] for x in sorted(points)], k == len(order)


def frontier_points(D: np.ndarray, allocations: Allocations, grid=FRONTIER_GRID,
                    cancelled: Callable[[], bool] = lambda: False) -> list[FrontierPoint] | None:
    """The whole IMPQ frontier, as points to plot (None when cancelled)."""
    for points, complete in frontier_progress(D, allocations, grid, cancelled=cancelled):
        if complete:
            return points
    return None


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


def full_precision_bytes(costs: Costs, dtype: str) -> int:
    """Bytes of the quantized layers' weights at the run's full precision."""
    return sum(costs.params) * DTYPE_BYTES.get(dtype, 4)


def clamp_bits(bits: float) -> float:
    return round(min(BITS_MAX, max(BITS_MIN, bits)), 2)


def top_interactions(K: np.ndarray, n: int = 3) -> list[tuple[int, int, float]]:
    """The n largest off-diagonal |K_ij| (i < j), strongest first."""
    L = K.shape[0]
    pairs = [(i, j, float(K[i, j])) for i in range(L) for j in range(i + 1, L)]
    pairs.sort(key=lambda p: -abs(p[2]))
    return pairs[:n]
