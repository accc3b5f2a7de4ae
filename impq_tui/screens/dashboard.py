"""The dashboard of one run: SPQE progress, the budget and its allocation, and the views
of the estimates (convergence, bit map, interactions, frontier, compare, log).

Every run is followed on disk (impq_tui.follow), whoever writes it: a thread worker
looks at the folder and posts a snapshot when it changed. The screen holds what it
shows in reactives: a new D (one row per finished sample), budget or allocation model
re-fits and re-solves in an exclusive worker, and each pane redraws from the reactives
it watches. Pause, continue and stop are signals to the run's own process.

The allocation model (`m` cycles it) is IMPQ, the paper's, or one of our extensions,
IMPQ-local and IMPQ-fit (core.results.RUN_METHODS), labelled so in every pane. IMPQ-fit's
model is fitted in a child process (analysis.FitProcess), one fit at a time: new samples
let the fit in work finish and fit again after it, choosing another model kills it.
"""
from __future__ import annotations

import json
import re
import shutil
import threading
import time

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static, TabbedContent, TabPane, Tabs
from textual.worker import get_current_worker

from core.errors import UserError
from core.files import read_bytes
from core.results import IMPQ, IMPQ_FIT
from core.runs import SAMPLES, RunConfig, RunDir, write_atomic
from core.settle import SettleRule
from core.solver import Allocation, Costs, budget_bytes

from impq_tui import analysis
from impq_tui.analysis import Fit, FitProcess, FitResult, FrontierPoint, model_label
from impq_tui.follow import FINAL, RunSource, Snapshot
from impq_tui.solver_process import FrontierJob, SolveJob, SolverProcess
from impq_tui.messages import (
    Fitted,
    FrontierReady,
    LogLine,
    ModelFitted,
    RunPolled,
    SolveEnded,
    Stability,
)
from impq_tui.widgets.compare import CompareView
from impq_tui.widgets.details import InteractionDetail, LayerDetail, SettleDetail
from impq_tui.widgets.interactions import KGrid
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.panes import BudgetPane, BudgetSlider, ProgressPane
from impq_tui.widgets.plots import EstimatesPlot, FrontierPlot, SettlePlot

VIEWS = ("estimates", "bits", "interactions", "frontier", "compare", "log")
BUDGET = Binding.Group("Budget", compact=True)
NO_SAMPLES = np.empty((0, 0))
NO_PERMS = np.empty((0, 0), dtype=np.int64)
UI_STATE = "ui.json"       # what the user left on screen for a run: its budget and model
REMEMBER_AFTER_S = 0.5     # the budget is written once it has rested this long


def remembered(run: RunDir, levels=(2, 4)) -> tuple[float | None, str | None]:
    """The budget and allocation model last left on this run's dashboard (ui.json), each
    if there and valid (the budget within the range of the run's `levels`)."""
    try:      # core.files: bounded, and a FIFO in its place is refused, never read
        state = json.loads(read_bytes(run.path / UI_STATE, "the run's ui.json", limit=4096))
    except (UserError, OSError, ValueError):
        return None, None
    if not isinstance(state, dict):
        return None, None
    try:
        bits = float(state["bits"])
    except (KeyError, ValueError, TypeError):
        bits = None
    lo, hi = analysis.bits_range(levels)
    if bits is not None and not lo <= bits <= hi:
        bits = None
    method = state.get("method")
    return bits, method if method in analysis.MODELS else None


# The engine's last word in events.log when a run stopped before its samples because the
# decision settled (core.engine, README "Early stop").
SETTLED_LINE = re.compile(r"completed \(settled\) with (\d+) of (\d+) samples")
RUN_LINE = re.compile(r"^\S+ (start: |completed|cancelled|interrupted|error: )")


def settled_stop(log: tuple[str, ...]) -> tuple[int, int] | None:
    """(samples, of the most) when the latest run of the process in `log` ended settled;
    None when it ended otherwise or has not ended."""
    for line in reversed(log):
        if RUN_LINE.match(line):
            found = SETTLED_LINE.search(line)
            return (int(found.group(1)), int(found.group(2))) if found else None
    return None


class KColored(Message):
    """K's colours (analysis.diverging_colors) and its scale's, for the fit of the samples
    `of`, computed by the solver process after the allocation."""

    def __init__(self, of, colors: list, legend: list) -> None:
        super().__init__()
        self.of, self.colors, self.legend = of, colors, legend


def remembered_bits(run: RunDir) -> float | None:
    """The budget last left on this run's dashboard (ui.json), if any and valid."""
    return remembered(run)[0]


def remember_bits(run: RunDir, bits: float, method: str = IMPQ) -> None:
    """Keep the budget and model in the run's ui.json (whole or not at all; a read-only
    run folder just forgets them)."""
    try:
        write_atomic(run.path / UI_STATE, json.dumps({"bits": bits, "method": method}) + "\n")
    except OSError:
        pass


class Dashboard(Screen):
    AUTO_FOCUS = ""       # keys belong to the screen: arrows move the budget
    BINDINGS = [
        Binding("left", "budget(-0.05)", "budget −0.05", group=BUDGET),
        Binding("right", "budget(0.05)", "budget +0.05", group=BUDGET),
        Binding("minus", "budget(-0.05)", "budget −0.05", show=False),
        Binding("plus,equals_sign", "budget(0.05)", "budget +0.05", show=False),
        Binding("left_square_bracket,shift+left,pagedown", "budget(-0.25)", "budget −0.25", show=False),
        Binding("right_square_bracket,shift+right,pageup", "budget(0.25)", "budget +0.25", show=False),
        Binding("b", "ask_budget", "type a budget", show=False),
        Binding("m", "next_model", "Model"),
        Binding("p", "pause", "Pause"),
        Binding("p", "resume", "Resume"),
        Binding("s", "stop", "Stop"),
        Binding("r", "continue_run", "Continue"),
        Binding("e", "export", "Export"),
        Binding("c", "compare", "Compare"),
        Binding("escape", "stop_job", "Stop compare"),
        Binding("n", "new_run", "New"),
        *(Binding(str(i), f"view('{v}')", f"view {v}", show=False) for i, v in enumerate(VIEWS, 1)),
        Binding("up", "scroll_log(-1)", "scroll the log or K", show=False),
        Binding("down", "scroll_log(1)", "scroll the log or K", show=False),
        Binding("q", "quit", "Quit"),
    ]

    snapshot: var[Snapshot | None] = var(None, init=False, always_update=True)
    state: var[str] = var("opened", init=False, bindings=True)
    D: var[np.ndarray] = var(NO_SAMPLES, init=False, always_update=True)
    costs: var[Costs | None] = var(None, init=False)
    bits: var[float] = var(3.0, init=False)
    method: var[str] = var(IMPQ, init=False)             # the allocation model (analysis.MODELS)
    solving: var[bool] = var(False, init=False)
    fitting: var[bool] = var(False, init=False)          # IMPQ-fit's model is being fitted
    fit: var[Fit | None] = var(None, init=False, always_update=True)
    allocation: var[Allocation | None] = var(None, init=False, always_update=True)
    unchanged: var[int | None] = var(None, init=False)    # samples the allocation held for
    frontier: var[list[FrontierPoint] | None] = var(None, init=False)
    picked: var[int | None] = var(None, init=False)       # the layer clicked on the bit map

    # A headless app (tests, the screenshot script, benchmarks) neither reads nor writes
    # ui.json, so that what it shows depends on the run's data alone.
    remember_headless = False

    def __init__(self, source: RunSource, *, created: bool = False, bits: float = 3.0,
                 solver: SolverProcess | None = None) -> None:
        """bits: the budget to start at, unless the run remembers the one last left;
        solver: a solver process started already (the app starts one with its run), which
        the screen then owns; else it starts its own when mounted."""
        super().__init__()
        self.source = source
        self.run = source.run
        self.created = created               # a run the form made: an early failure removes it
        self.config: RunConfig | None = None
        self.set_reactive(Dashboard.bits, analysis.clamp_bits(bits))
        self.k_colors: list | None = None      # K as RGB cells, for the interaction view
        self._k_colors_of: np.ndarray | None = None   # the D whose K they colour
        # fits, solves and the frontier: a process of their own (on_mount starts it if need be)
        self.solver: SolverProcess | None = solver
        self._frontier_of: tuple | None = None   # (model, D) of the frontier computed or in work
        self._frontier_worker = None
        self._solve_worker = None              # the one solve in work (see _solve)
        self._solve_pending = False            # another budget or sample waits for it
        # complete frontiers by (model, samples)
        self._frontiers: dict[tuple[str, int], list[FrontierPoint]] = {}
        self.P: np.ndarray = NO_PERMS          # the permutations behind the rows of D
        self.fitted: FitResult | None = None   # IMPQ-fit's latest model (or refusal)
        self._fit_worker = None                # the one IMPQ-fit process in work
        self._fit_process: FitProcess | None = None
        self._fit_started: float | None = None     # when it started (time.monotonic)
        self._fit_for: np.ndarray = NO_SAMPLES     # the D it fits
        self._fitted_of: np.ndarray | None = None  # the D that self.fitted was made from
        self._remember_timer = None
        self._remember_lock = threading.Lock()   # one ui.json write at a time, newest last
        self._remember_seq = 0               # the budget changes asked to be kept so far
        self._remembered_seq = 0             # the newest of them written
        self._first_screen = False           # the first allocation and frontier were drawn
        self._fit_of: np.ndarray | None = None   # the D that self.fit was made from
        self._follower = None
        self._asked: tuple[str, int] | None = None    # (state asked for, of which pid)
        self._failure_shown = None           # the process whose failure was reported
        self._log_lines = 0
        self._bindings_of: tuple | None = None    # what the footer's keys were drawn for
        self.discarded = False               # the run folder was removed (failed at once)

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield ProgressPane(id="progress")
        yield BudgetPane(id="budget")
        with TabbedContent(initial="estimates", id="views"):
            with TabPane("1 Estimates", id="estimates"):
                with Horizontal(id="estimates-row"):
                    yield EstimatesPlot(id="estimates-plot")
                    yield SettlePlot(id="settle-plot")
                yield SettleDetail(id="settle-detail").data_bind(
                    Dashboard.fit, Dashboard.allocation, Dashboard.unchanged, Dashboard.bits,
                    Dashboard.method)
            with TabPane("2 Bits", id="bits"):
                with Vertical(id="bits-box"):
                    yield Static(id="bits-title")
                    yield LayerMap(id="layer-map").data_bind(Dashboard.picked)
                    yield LayerDetail(id="layer-detail").data_bind(
                        Dashboard.fit, Dashboard.allocation, Dashboard.costs, Dashboard.picked,
                        Dashboard.method)
            with TabPane("3 Interactions", id="interactions"):
                with Horizontal(id="interactions-row"):
                    with VerticalScroll(id="k-scroll"):
                        yield KGrid(id="k-grid")
                    yield InteractionDetail(id="interaction-detail").data_bind(
                        Dashboard.fit, Dashboard.method)
            with TabPane("4 Frontier", id="frontier"):
                yield FrontierPlot(id="frontier-plot")
            with TabPane("5 Compare", id="compare"):
                yield CompareView(id="compare-view")
            with TabPane("6 Log", id="log"):
                yield RichLog(id="log-view", markup=False, wrap=True, max_lines=2000)
        yield Footer()

    def on_resize(self) -> None:
        # A tall terminal has room for the full layer map under the budget.
        self.query_one("#budget-strip", LayerMap).compact = self.size.height < 36

    def on_mount(self) -> None:
        if self.solver is None:   # first: its imports are paid while the run is read and drawn
            self.solver = SolverProcess()
        # Arrow keys drive the budget, so the tab strip never takes focus from the screen.
        for widget in (*self.query(Tabs), self.query_one(RichLog), self.query_one("#k-scroll"),
                       self.query_one(CompareView)):
            widget.can_focus = False
        if self.remembers:
            bits, method = remembered(self.run)   # a few bytes: read before the first draw
            if bits is not None:
                self.set_reactive(Dashboard.bits, analysis.clamp_bits(bits))
            if method is not None:
                self.set_reactive(Dashboard.method, method)
        self._show_model()
        self._show_progress()
        self.set_interval(1.0, self._tick)
        self._follower = self.app.run_worker(self._follow, name="follow", group="follow",
                                             thread=True, exit_on_error=False)

    def on_unmount(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self._fit_process is not None:          # no fit left running after the app
            self._fit_process.kill()
        if self.solver is not None:
            self.solver.close()
        if self._remember_timer is not None:       # a budget not written yet
            self._remember_timer.stop()
        if self._remember_seq:                     # written now, whatever is still in work
            self._keep(self._remember_seq, self.bits, self.method)

    @property
    def remembers(self) -> bool:
        """Whether the budget is kept in the run's ui.json (see remember_headless)."""
        return self.remember_headless or not self.app.is_headless

    def _tick(self) -> None:
        """Every second: the elapsed clock and ETA of a run going on, and the clock of a
        fit in work."""
        if self.state in ("running", "stopping") and self.snapshot is not None:
            self._show_progress()
        if self.fitting:
            self._show_model()

    # ------------------------------------------------------------------ the run on disk
    def _follow(self) -> None:
        """On a worker thread: a snapshot now, and one whenever the run folder changes."""
        worker = get_current_worker()
        self.source.follow(lambda snapshot: self.post_message(RunPolled(snapshot)),
                           worker.cancelled_event)

    def on_run_polled(self, message: RunPolled) -> None:
        if not self.discarded:
            self.snapshot = message.snapshot

    def watch_snapshot(self, old: Snapshot | None, snap: Snapshot) -> None:
        self.config = snap.config
        if snap.costs is not None and self.costs is None:
            self.costs = snap.costs
        if snap.D.shape != self.D.shape or not np.array_equal(snap.D, self.D):
            self.P = snap.P         # before D: its watchers read both
            self.D = snap.D
        self.state = self._state_of(snap)
        self._show_log(snap.log)
        self._show_progress()
        process = self.source.process
        key = (snap.writer, snap.controllable, len(snap.D), self.state,
               process is not None and process.poll() is None)
        if key != self._bindings_of:    # the footer's keys are redrawn only when they change
            self._bindings_of = key
            self.refresh_bindings()
        if old is None and not len(snap.D):
            self._when_idle()
        if snap.error is not None and self._failure_shown is not self.source.process:
            self._failure_shown = self.source.process
            self._failed(snap.error)

    def _state_of(self, snap: Snapshot) -> str:
        """The snapshot's state, or what was asked of its writer until the writer does it
        (pause and stop take effect after the evaluation in flight)."""
        if self._asked is None:
            return snap.state
        wanted, pid = self._asked
        if snap.writer.alive and snap.writer.pid == pid and snap.state != wanted:
            return wanted
        self._asked = None
        if wanted == "stopping" and snap.state not in FINAL:
            return "cancelled"    # stopped before it could say so (still importing)
        return snap.state

    def _failed(self, message: str) -> None:
        """The run's process ended with an error. A run the form just made that failed
        before its first sample is removed, as `impq-tui run` does, and the form comes
        back for the input to be fixed."""
        self.log_line(message, "error")
        then = None
        if self.created and not self.run.has(SAMPLES):
            self.discarded = True
            self._follower.cancel()
            shutil.rmtree(self.run.path, ignore_errors=True)
            then = lambda _: self.app.new_run(self)   # noqa: E731
        self.app.show_error("SPQE stopped", message, then)

    def _show_log(self, lines: tuple[str, ...]) -> None:
        if len(lines) < self._log_lines:
            self._log_lines = 0       # a new events.log
        for line in lines[self._log_lines:]:
            self.log_line(line)
        self._log_lines = len(lines)

    def on_log_line(self, message: LogLine) -> None:
        self.log_line(message.message, message.level)

    def log_line(self, text: str, level: str = "info") -> None:
        style = {"error": "bold red", "warning": "yellow"}.get(level, "")
        self.query_one("#log-view", RichLog).write(Text(text, style=style))

    @property
    def writer(self):
        """The process writing the run now, if one is alive (snapshot.writer)."""
        snap = self.snapshot
        return snap.writer if snap is not None and snap.writer.alive else None

    # ------------------------------------------------------------------ fitting and solving
    @property
    def levels(self) -> tuple[int, ...]:
        """The run's precisions, ascending (the paper's 2 and 4 until its costs are read)."""
        return self.costs.levels if self.costs is not None else (2, 4)

    def watch_costs(self, costs: Costs) -> None:
        levels = costs.levels
        for layer_map in self.query(LayerMap):
            layer_map.levels = levels
        self.query_one(BudgetSlider).levels = levels
        self.query_one(FrontierPlot).levels = levels
        lo, hi = analysis.bits_range(levels)
        if (lo, hi) != (analysis.BITS_MIN, analysis.BITS_MAX):
            # the budget was read against 2..4 before the run's levels were known
            bits = remembered(self.run, levels)[0] if self.remembers else None
            if bits is None:
                bits = self.bits if lo <= self.bits <= hi else (lo + hi) / 2
            self.set_reactive(Dashboard.bits, analysis.clamp_bits(bits, levels))
            self._show_model()
        self._solve()
        self._show_budget()

    def watch_D(self) -> None:
        self.unchanged = None
        self._ensure_fit()
        self._solve()
        self._maybe_frontier()

    def watch_bits(self, bits: float) -> None:
        self.unchanged = None
        self._solve()
        self._show_model()
        self.query_one(FrontierPlot).show(bits=bits, y=self._marker_y())
        self._remember_later()

    def watch_method(self, method: str) -> None:
        """Another allocation model: its allocation and frontier replace the other's (which
        are not this model's and are taken off the screen at once)."""
        self.unchanged = None
        if method != IMPQ_FIT:
            self._stop_fit()
        self.allocation = None
        self.frontier = None
        self._ensure_fit()
        self._solve()
        self._maybe_frontier()
        self._show_model()
        self._remember_later()

    def _remember_later(self) -> None:
        if self.remembers:
            if self._remember_timer is not None:
                self._remember_timer.stop()
            self._remember_seq += 1
            self._remember_timer = self.set_timer(REMEMBER_AFTER_S, self._remember)

    def _remember(self) -> None:
        self._remember_timer = None
        seq, bits, method = self._remember_seq, self.bits, self.method
        self.app.run_worker(lambda: self._keep(seq, bits, method), name="remember",
                            group="remember", thread=True, exit_on_error=False)

    def _keep(self, seq: int, bits: float, method: str) -> None:
        """Write the budget of change number seq unless a newer one was written already
        (a write in a thread may finish after the one made on leaving)."""
        with self._remember_lock:
            if seq > self._remembered_seq:
                remember_bits(self.run, bits, method)
                self._remembered_seq = seq

    def watch_state(self) -> None:
        self._show_progress()
        self._maybe_frontier()

    def watch_solving(self) -> None:
        self._show_budget()

    def watch_fitting(self) -> None:
        self._show_model()

    def watch_unchanged(self) -> None:
        self._show_budget()

    def watch_fit(self, fit: Fit) -> None:
        self.query_one(EstimatesPlot).show(fit, self.levels)
        self.query_one(SettlePlot).show(fit)
        if self._k_colors_of is self._fit_of or not np.any(fit.layer_K):
            self.query_one(KGrid).show(fit.layer_K if self.k_colors else None, self.k_colors)
        # else the grid keeps the colours it has until this K's come (on_kcolored)

    def on_kcolored(self, message: KColored) -> None:
        if message.of is not self._fit_of or self.fit is None:
            return          # of samples no longer on screen
        self.k_colors, self._k_colors_of = message.colors, message.of
        self.query_one(InteractionDetail).legend = message.legend
        self.query_one(KGrid).show(self.fit.layer_K, self.k_colors)

    def watch_allocation(self, allocation: Allocation | None) -> None:
        phi = tuple(map(float, self.fit.layer_phi)) if self.fit is not None else None
        bits = allocation.bits_per_layer if allocation is not None else None
        self.query_one("#layer-map", LayerMap).show(bits, phi)
        self.query_one("#budget-strip", LayerMap).show(bits, phi)
        self._show_model()
        self.query_one(FrontierPlot).show(bits=self.bits, y=self._marker_y())

    def watch_frontier(self, points: list[FrontierPoint] | None) -> None:
        self.query_one(FrontierPlot).show(points or [], self.bits, self._marker_y())

    @property
    def is_current(self) -> bool:
        """Everything on screen reflects the run on disk, the budget and the model held
        now (for tests and the screenshot script, which wait for it)."""
        if self.snapshot is None:
            return False
        if not len(self.D) or self.costs is None:
            return True
        settled = not self.solving and self.fit is not None and self.fit.samples == len(self.D)
        if self.method == IMPQ_FIT:
            if self.fitting or self.fitted is None or self._fitted_of is not self.D:
                return False
            if self.fitted.model is None:      # core.fit refused: its message is shown
                return settled and self.allocation is None
        return (settled and self.allocation is not None
                and self.allocation.target_bits == self.bits)

    def _solve(self) -> None:
        """Fit the samples and solve at the budget by the chosen model, in the solver
        process (impq_tui.solver_process), waited for by a worker thread. One solve at a
        time: a newer budget, model or sample cancels the one in flight (its answer would
        be stale, and SCIP finishes the solve it is in) and starts when it has ended, so
        keys pressed faster than SCIP solves skip the budgets passed over. The fit, K's
        colours and the stability check come in that order after the allocation.
        IMPQ-fit solves with the latest model fitted (FitProcess), which may be of fewer
        samples while the next fit is in work; the panes say so."""
        if self.costs is None or not len(self.D):
            return
        self.solving = True
        if self._solve_worker is not None:
            self._solve_worker.cancel()
            self._solve_pending = True
            return
        of, bits, method = self.D, self.bits, self.method
        # a new budget on the same samples keeps their fit (and the plots drawn from it)
        fit = self.fit if self._fit_of is of and self.fit is not None else None
        colored = fit is not None and (self._k_colors_of is of or not np.any(fit.layer_K))
        job = SolveJob(D=of, P=self.P, costs=self.costs, bits=bits, method=method,
                       paired=self.config.antithetic, fit=not colored,
                       states=self.fitted if method == IMPQ_FIT else None)
        solver = self.solver

        def fit_and_solve() -> None:
            worker = get_current_worker()
            try:
                for reply in solver.solve(job, cancelled=lambda: worker.is_cancelled):
                    if worker.is_cancelled:
                        return
                    if reply[0] == "solved":      # the fit the screen has, if it has one
                        self.post_message(Fitted(fit or reply[1], bits, reply[2], None, of, method))
                    elif reply[0] == "colors":
                        self.post_message(KColored(of, reply[1], reply[2]))
                    else:
                        self.post_message(Stability(len(of), bits, reply[1], method))
            finally:
                self.post_message(SolveEnded(worker))

        self._solve_worker = self.app.run_worker(fit_and_solve, name="solve", group="solve",
                                                 exclusive=True, thread=True, exit_on_error=False)

    def on_solve_ended(self, message: SolveEnded) -> None:
        if message.worker is not self._solve_worker:
            return
        self._solve_worker = None
        if self._solve_pending:
            self._solve_pending = False
            self._solve()

    def on_fitted(self, message: Fitted) -> None:
        if message.bits != self.bits or message.of is not self.D or message.method != self.method:
            return    # a newer budget, sample or model is being solved
        self.solving = False
        self._fit_of = message.of
        if message.fit is not self.fit:
            if not np.any(message.fit.layer_K):   # one sample: no K to colour
                self.k_colors, self._k_colors_of = None, message.of
            self.fit = message.fit
        self.allocation = message.allocation
        self._when_idle()

    # ------------------------------------------------------------------ IMPQ-fit's model
    def _ensure_fit(self) -> None:
        """With IMPQ-fit chosen, fit its model of the samples on screen in a child process,
        unless it is fitted or a fit is in work. One fit at a time: one in work for fewer
        samples finishes first (a fit of 80 layers takes a minute on 2 cores; a run adds
        a sample every few seconds, and cancelling on each would never let one end), and
        on_model_fitted then starts the next."""
        if self.method != IMPQ_FIT or not len(self.D) or self._fit_worker is not None:
            return
        if self.fitted is not None and self._fitted_of is self.D:
            return
        D, P = self.D, self.P
        process = self._fit_process = FitProcess(D, P)
        self._fit_for = D
        self._fit_started = time.monotonic()
        self.fitting = True

        def fit() -> None:
            worker = get_current_worker()
            result = None
            try:
                result = process.result(cancelled=lambda: worker.is_cancelled)
            finally:
                self.post_message(ModelFitted(worker, result))

        self._fit_worker = self.app.run_worker(fit, name="impq-fit", group="impq-fit",
                                               thread=True, exit_on_error=False)

    def _stop_fit(self) -> None:
        """Kill the fit in work (another model was chosen, or the screen goes away)."""
        if self._fit_process is not None:
            self._fit_process.kill()
        if self._fit_worker is not None:
            self._fit_worker.cancel()
        self._fit_worker = self._fit_process = None
        self.fitting = False

    def on_model_fitted(self, message: ModelFitted) -> None:
        if message.worker is not self._fit_worker:
            return     # killed: another model was chosen meanwhile
        self._fit_worker = self._fit_process = None
        if message.result is not None:         # None: it failed, and the app says why
            self.fitted, self._fitted_of = message.result, self._fit_for
        self.fitting = False
        if self.method == IMPQ_FIT and message.result is not None:
            self._ensure_fit()       # samples that came meanwhile are fitted next
            self._solve()
            self._maybe_frontier()
        self._show_model()

    def _model_note(self) -> str | None:
        """Where IMPQ-fit's model stands when it is not simply fitted to the samples on
        screen: being fitted (with its clock), fitted to fewer samples, or refused by
        core.fit (its own words: too few samples)."""
        if self.method != IMPQ_FIT or not len(self.D):
            return None
        parts = []
        done = self.fitted
        if done is not None and done.model is not None and self._fitted_of is not self.D:
            parts.append(f"fitted on {done.samples} of {len(self.D)} samples")
        if self.fitting:
            took = time.monotonic() - (self._fit_started or time.monotonic())
            parts.append(f"fitting on {len(self._fit_for)} samples… {took:.0f} s")
        elif done is not None and done.error is not None:
            parts.append(done.error)
        return " · ".join(parts) or None

    def _when_idle(self) -> None:
        """What waits until the first screen and the frontier are drawn: the saved
        comparison, read in a thread (reading it imports torch, which holds the GIL for
        a tenth of a second at a time)."""
        busy = self._frontier_worker is not None and self._frontier_worker.is_running
        if self._first_screen or busy:
            return
        self._first_screen = True
        snap = self.snapshot
        self.query_one(CompareView).load_saved(self.run, snap.config.backend, len(snap.D), self.bits)

    def on_stability(self, message: Stability) -> None:
        if (message.bits == self.bits and message.samples == len(self.D)
                and message.method == self.method):
            self.unchanged = message.unchanged

    def _maybe_frontier(self) -> None:
        """41 solves by the chosen model, coarse budgets first (analysis.frontier_progress),
        in the solver process, drawn in batches as they come: worth it when the frontier is
        on screen, or when no run competes for the CPU. New samples make the one in work
        stale: it is cancelled and the new one starts; a complete frontier is kept per
        model and sample count. The solve at the budget goes first (the solver process
        holds the frontier back while one is in work). IMPQ-fit's waits for its model of
        these samples."""
        method, D = self.method, self.D
        if self.costs is None or not len(D) or (
                self._frontier_of is not None and self._frontier_of[0] == method
                and self._frontier_of[1] is D):
            return
        if self._frontier_worker is not None:
            self._frontier_worker.cancel()      # of older samples or another model: stale
            self._frontier_worker = None
        if self.query_one(TabbedContent).active != "frontier" and self.writer is not None:
            return
        states = None
        if method == IMPQ_FIT:
            if self.fitted is None or self._fitted_of is not D:
                return                          # on_model_fitted comes back here
            if self.fitted.model is None:       # refused: the plot says why
                self._frontier_of = (method, D)
                self.frontier = []
                return
            states = self.fitted.model
        self._frontier_of = (method, D)
        if (method, len(D)) in self._frontiers:
            self.frontier = self._frontiers[(method, len(D))]
            return
        job = FrontierJob(D=D, P=self.P, costs=self.costs, method=method,
                          paired=self.config.antithetic, fitted=states)
        solver = self.solver

        def frontier() -> None:
            worker = get_current_worker()
            for points, complete in solver.frontier(job, cancelled=lambda: worker.is_cancelled):
                if worker.is_cancelled:
                    return
                self.post_message(FrontierReady(len(D), points, complete, method))

        self._frontier_worker = self.app.run_worker(frontier, name="frontier", group="frontier",
                                                    exclusive=True, thread=True, exit_on_error=False)

    def on_frontier_ready(self, message: FrontierReady) -> None:
        if message.samples != len(self.D) or message.method != self.method:
            return       # stale: a newer frontier is in work
        if message.complete:
            self._frontiers[(message.method, message.samples)] = message.points
        self.frontier = message.points
        if message.complete:
            self._frontier_worker = None        # it has nothing left to do
            if self.allocation is not None:
                self._when_idle()

    @on(TabbedContent.TabActivated)
    def _view_changed(self) -> None:
        self._maybe_frontier()
        snap = self.snapshot
        if self.query_one(TabbedContent).active == "compare" and snap is not None:
            # shown before its thread read it (the first second): read it now
            self.query_one(CompareView).show_saved(self.run, snap.config.backend, len(snap.D),
                                                   self.bits)

    def _marker_y(self) -> float | None:
        a = self.allocation
        return a.predicted_delta_nll if a is not None and a.target_bits == self.bits else None

    # ------------------------------------------------------------------ the budget
    def set_bits(self, bits: float) -> None:
        self.bits = analysis.clamp_bits(bits, self.levels)

    def action_budget(self, step: float) -> None:
        self.set_bits(self.bits + step)

    def action_ask_budget(self) -> None:
        from impq_tui.screens.modals import NumberModal

        def chosen(bits: float | None) -> None:
            if bits is not None:
                self.set_bits(bits)

        lo, hi = analysis.bits_range(self.levels)
        self.app.push_screen(NumberModal(f"Average bits per weight ({lo:.2f} to {hi:.2f})",
                                         f"{self.bits:.2f}", minimum=lo, maximum=hi), chosen)

    @on(BudgetSlider.Changed)
    def _slider(self, event: BudgetSlider.Changed) -> None:
        self.set_bits(event.bits)

    @on(LayerMap.Picked)
    def _picked(self, event: LayerMap.Picked) -> None:
        self.picked = event.layer

    # ------------------------------------------------------------------ the panes above
    def _show_progress(self) -> None:
        pane = self.query_one(ProgressPane)
        snap, config = self.snapshot, self.config
        if snap is None or config is None:
            pane.show(state=self.state, detail=str(self.run.path), done=0, total=0,
                      progress=None, summary="reading the run folder…")
            return
        parts = [config.model_name or config.model, config.backend]
        writer = self.writer
        if writer is not None:      # before the folder, which a narrow screen cuts short
            parts.append(f"pid {writer.pid}" + ("" if writer.here else f" on {writer.host}"))
        parts.append(str(self.run.path))
        if self.state == "failed" and snap.status and snap.status.get("message"):
            parts.append(snap.status["message"])
        detail = " · ".join(parts)
        summary = (f"{config.device} · {config.dtype} · calibration {config.windows} × "
                   f"{config.window_tokens} tokens of {config.calib_text} · seed {config.seed}"
                   + (" · antithetic" if config.antithetic else ""))
        total, stop = config.samples, None
        if config.until_settled:
            stop = settled_stop(snap.log) if self.state == "completed" else None
            if stop:        # the run ended there: its bar is full, its maximum said below
                total = len(self.D)
            watched = "/".join(f"{b:g}" for b in self._settle_budgets(config))
            summary = (f"settled at sample {stop[0]} of {stop[1]}: the allocations at {watched} "
                       f"bits held for {SettleRule.K} samples · " if stop else
                       f"until settled at {watched} bits · ") + summary
        pane.show(state=self.state, detail=detail, done=len(self.D), total=total,
                  progress=snap.progress, summary=summary, age_s=self._progress_age(snap))

    def _settle_budgets(self, config: RunConfig) -> tuple[float, ...]:
        """The budgets the run's early stop watches (those of its levels, core.settle)."""
        from core.settle import budgets_for

        try:
            return budgets_for(self.levels, config.until_settled)
        except UserError:      # outside the levels: the run refuses them, and says so
            return config.until_settled

    def _progress_age(self, snap: Snapshot) -> float:
        """Seconds since the writer reported its progress, while it runs: the elapsed clock
        ticks every second although status.json is rewritten about once a second and read
        every half second. Bounded, so a clock set differently on another host cannot run
        it far off."""
        if self.state != "running" or not snap.status:
            return 0.0
        return min(max(time.time() - float(snap.status.get("time", 0.0)), 0.0), 5.0)

    def _show_budget(self) -> None:
        config = self.config
        full = (analysis.full_precision_bytes(self.costs, config.dtype)
                if self.costs is not None and config is not None else None)
        # the negative-prediction test of noise_note holds for the paper's model only
        allocation = self.allocation if self.method == IMPQ else None
        self.query_one(BudgetPane).show(
            bits=self.bits, allocation=self.allocation, full_bytes=full,
            dtype=config.dtype if config else "", solving=self.solving, unchanged=self.unchanged,
            relative_se=self.fit.settle[-1] if self.fit and self.fit.settle else None,
            samples=len(self.D),
            budget_bytes=budget_bytes(self.costs, self.bits) if self.costs is not None else None,
            noise=analysis.noise_note(self.fit, allocation) if self.fit is not None else None,
            method=self.method, model_note=self._budget_note(), levels=self.levels)

    def _budget_note(self) -> str | None:
        """_model_note, and for IMPQ-fit whether its allocation's prediction is an
        extrapolation (analysis.extrapolation_note)."""
        notes = [self._model_note()]
        if self.method == IMPQ_FIT:
            notes.append(analysis.extrapolation_note(self.D, self.P, self.allocation))
        return " · ".join(n for n in notes if n) or None

    def _show_model(self) -> None:
        """Which model the allocation and its predictions are of, wherever they are shown:
        the budget pane, the bit map's title, the picked layer's terms and the frontier."""
        self._show_budget()
        note = self._model_note()
        label = model_label(self.method)
        title = f"[b]{escape(label)}[/b] allocation at {self.bits:.2f} bits"
        if note is not None:
            title += f" · [$warning]{escape(note)}[/]"
        self.query_one("#bits-title", Static).update(title)
        detail = self.query_one(LayerDetail)
        done = self.fitted
        detail.fitted_u = (done.model.u if self.method == IMPQ_FIT and done is not None
                           and done.model is not None else None)
        self.query_one(FrontierPlot).set_model(label, note)

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        writer = self.writer
        here = writer is not None and writer.here
        if action == "pause":
            return here and self.state == "running" and self.snapshot.controllable
        if action == "resume":
            return here and self.state == "paused" and self.snapshot.controllable
        if action == "stop":
            return here and self.state != "stopping"
        if action == "continue_run":
            starting = self.source.process is not None and self.source.process.poll() is None
            return self.snapshot is not None and writer is None and not starting
        if action == "compare":
            # greyed while SPQE runs (both would want the device) or a comparison runs
            busy = writer is not None or self.query_one(CompareView).running
            return None if busy or not len(self.D) else True
        if action == "stop_job":
            return self.query_one(CompareView).running
        return True

    def _ask(self, state: str, send) -> None:
        """Signal the run's process; show `state` until the process shows it itself."""
        pid = self.writer.pid
        try:
            send(pid)
        except OSError as exc:
            self.app.notify(f"could not signal pid {pid}: {exc}", severity="error")
            return
        self._asked = (state, pid)
        self.state = state
        self.source.wake()

    def action_pause(self) -> None:
        self._ask("paused", self.source.pause)

    def action_resume(self) -> None:
        self._ask("running", self.source.resume)

    def action_stop(self) -> None:
        self._ask("stopping", self.source.stop)

    def stop_run(self) -> None:
        """Stop the writer (quitting with "stop it")."""
        if self.writer is not None and self.writer.here:
            self.action_stop()

    def action_continue_run(self) -> None:
        from impq_tui.screens.modals import NumberModal

        done = len(self.D)

        def chosen(samples: float | None) -> None:
            if samples is None:
                return
            self.created = False
            try:
                self.source.start(int(samples))
            except OSError as exc:
                self.app.show_error("Cannot continue the run", f"the run's process did not start: {exc}")
                return
            self.state = "preparing"
            self.source.wake()

        # the run keeps its own early stop (`run --resume`), which starts afresh
        settles = (f"\nIt stops sooner once settled, after at least {SettleRule.K} more."
                   if self.config.until_settled else "")
        self.app.push_screen(NumberModal(f"Continue SPQE until how many samples? ({done} done){settles}",
                                         str(max(self.config.samples, done + 1)),
                                         minimum=done + 1, integer=True), chosen)

    def action_export(self) -> None:
        from impq_tui.screens.export import ExportScreen

        if self.allocation is None:
            why = self._model_note() if len(self.D) else None
            self.app.notify(f"No {model_label(self.method, short=True)} allocation yet: "
                            + (why or "export needs at least one finished sample."),
                            severity="warning", timeout=6)
            return
        self.app.push_screen(ExportScreen(self.run, self.allocation, self.bits, self.method))

    def action_next_model(self) -> None:
        """m: the next allocation model, IMPQ (the paper's) -> IMPQ-local -> IMPQ-fit (our
        extensions) -> IMPQ."""
        self.method = analysis.next_model(self.method)

    def action_compare(self) -> None:
        self.action_view("compare")     # the key's answer is on screen at once
        self.query_one(CompareView).start(self.run, self.bits, len(self.D))

    def action_stop_job(self) -> None:
        """Esc: stop the comparison running (it stops within a decoder layer's forward)."""
        self.query_one(CompareView).stop()

    async def action_quit(self) -> None:
        await self.app.action_quit()

    def action_new_run(self) -> None:
        self.app.new_run(self)

    def action_view(self, view: str) -> None:
        self.query_one(TabbedContent).active = view

    def action_scroll_log(self, lines: int) -> None:
        view = {"log": "#log-view", "interactions": "#k-scroll",
                "compare": "#compare-view"}.get(self.query_one(TabbedContent).active)
        if view:
            self.query_one(view).scroll_relative(y=lines, animate=False)
