"""The dashboard of one run: SPQE progress, the budget and its allocation, and the views
of the estimates (convergence, bit map, interactions, frontier, compare, log).

Every run is followed on disk (impq_tui.follow), whoever writes it: a thread worker
looks at the folder and posts a snapshot when it changed. The screen holds what it
shows in reactives: a new D (one row per finished sample) or budget re-fits and
re-solves in an exclusive worker, and each pane redraws from the reactives it watches.
Pause, continue and stop are signals to the run's own process.
"""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import Footer, RichLog, TabbedContent, TabPane, Tabs
from textual.worker import get_current_worker

from core.runs import SAMPLES, RunConfig, RunDir, write_atomic
from core.solver import Allocation, Costs, budget_bytes

from impq_tui import analysis
from impq_tui.analysis import Fit, FrontierPoint
from impq_tui.follow import FINAL, RunSource, Snapshot
from impq_tui.messages import Fitted, FrontierReady, LogLine, RunPolled, SolveEnded, Stability
from impq_tui.widgets.compare import CompareView
from impq_tui.widgets.details import InteractionDetail, LayerDetail, SettleDetail
from impq_tui.widgets.interactions import KGrid, diverging_colors
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.panes import BudgetPane, BudgetSlider, ProgressPane
from impq_tui.widgets.plots import EstimatesPlot, FrontierPlot, SettlePlot

VIEWS = ("estimates", "bits", "interactions", "frontier", "compare", "log")
BUDGET = Binding.Group("Budget", compact=True)
NO_SAMPLES = np.empty((0, 0))
UI_STATE = "ui.json"       # what the user left on screen for a run: its budget
REMEMBER_AFTER_S = 0.5     # the budget is written once it has rested this long


def remembered_bits(run: RunDir) -> float | None:
    """The budget last left on this run's dashboard (ui.json), if any and valid."""
    try:
        bits = float(json.loads((run.path / UI_STATE).read_text())["bits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bits if analysis.BITS_MIN <= bits <= analysis.BITS_MAX else None


def remember_bits(run: RunDir, bits: float) -> None:
    """Keep the budget in the run's ui.json (whole or not at all; a read-only run folder
    just forgets it)."""
    try:
        write_atomic(run.path / UI_STATE, json.dumps({"bits": bits}) + "\n")
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
    solving: var[bool] = var(False, init=False)
    fit: var[Fit | None] = var(None, init=False, always_update=True)
    allocation: var[Allocation | None] = var(None, init=False, always_update=True)
    unchanged: var[int | None] = var(None, init=False)    # samples the allocation held for
    frontier: var[list[FrontierPoint] | None] = var(None, init=False)
    picked: var[int | None] = var(None, init=False)       # the layer clicked on the bit map

    # A headless app (tests, the screenshot script, benchmarks) neither reads nor writes
    # ui.json, so that what it shows depends on the run's data alone.
    remember_headless = False

    def __init__(self, source: RunSource, *, created: bool = False, bits: float = 3.0) -> None:
        """bits: the budget to start at, unless the run remembers the one last left."""
        super().__init__()
        self.source = source
        self.run = source.run
        self.created = created               # a run the form made: an early failure removes it
        self.config: RunConfig | None = None
        self.set_reactive(Dashboard.bits, analysis.clamp_bits(bits))
        self.k_colors: list | None = None      # K as RGB cells, for the interaction view
        self._allocations: analysis.Allocations | None = None
        self._frontier_of: np.ndarray | None = None   # the D of the frontier computed or in work
        self._frontier_worker = None
        self._solve_worker = None              # the one solve in work (see _solve)
        self._solve_pending = False            # another budget or sample waits for it
        self._frontiers: dict[int, list[FrontierPoint]] = {}   # complete frontiers by samples
        self._remember_timer = None
        self._first_screen = False           # the first allocation and frontier were drawn
        self._fit_of: np.ndarray | None = None   # the D that self.fit was made from
        self._follower = None
        self._asked: tuple[str, int] | None = None    # (state asked for, of which pid)
        self._failure_shown = None           # the process whose failure was reported
        self._log_lines = 0
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
                    Dashboard.fit, Dashboard.allocation, Dashboard.unchanged, Dashboard.bits)
            with TabPane("2 Bits", id="bits"):
                with Vertical(id="bits-box"):
                    yield LayerMap(id="layer-map").data_bind(Dashboard.picked)
                    yield LayerDetail(id="layer-detail").data_bind(
                        Dashboard.fit, Dashboard.allocation, Dashboard.costs, Dashboard.picked)
            with TabPane("3 Interactions", id="interactions"):
                with Horizontal(id="interactions-row"):
                    with VerticalScroll(id="k-scroll"):
                        yield KGrid(id="k-grid")
                    yield InteractionDetail(id="interaction-detail").data_bind(Dashboard.fit)
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
        # Arrow keys drive the budget, so the tab strip never takes focus from the screen.
        for widget in (*self.query(Tabs), self.query_one(RichLog), self.query_one("#k-scroll"),
                       self.query_one(CompareView)):
            widget.can_focus = False
        if self.remembers:
            bits = remembered_bits(self.run)      # a few bytes: read before the first draw
            if bits is not None:
                self.set_reactive(Dashboard.bits, analysis.clamp_bits(bits))
        self._show_budget()
        self._show_progress()
        self.set_interval(1.0, self._tick)
        self._follower = self.app.run_worker(self._follow, name="follow", group="follow",
                                             thread=True, exit_on_error=False)

    def on_unmount(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        if self._remember_timer is not None:       # a budget not written yet
            self._remember_timer.stop()
            remember_bits(self.run, self.bits)

    @property
    def remembers(self) -> bool:
        """Whether the budget is kept in the run's ui.json (see remember_headless)."""
        return self.remember_headless or not self.app.is_headless

    def _tick(self) -> None:
        """Every second: the elapsed clock and ETA of a run going on."""
        if self.state in ("running", "stopping") and self.snapshot is not None:
            self._show_progress()

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
            self.D = snap.D
        self.state = self._state_of(snap)
        self._show_log(snap.log)
        self._show_progress()
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
    def watch_costs(self) -> None:
        self._solve()
        self._show_budget()

    def watch_D(self) -> None:
        self.unchanged = None
        self._solve()
        self._maybe_frontier()

    def watch_bits(self, bits: float) -> None:
        self.unchanged = None
        self._solve()
        self._show_budget()
        self.query_one(FrontierPlot).show(bits=bits, y=self._marker_y())
        if self.remembers:
            if self._remember_timer is not None:
                self._remember_timer.stop()
            self._remember_timer = self.set_timer(REMEMBER_AFTER_S, self._remember)

    def _remember(self) -> None:
        self._remember_timer = None
        run, bits = self.run, self.bits
        self.app.run_worker(lambda: remember_bits(run, bits), name="remember", group="remember",
                            thread=True, exit_on_error=False)

    def watch_state(self) -> None:
        self._show_progress()
        self._maybe_frontier()

    def watch_solving(self) -> None:
        self._show_budget()

    def watch_unchanged(self) -> None:
        self._show_budget()

    def watch_fit(self, fit: Fit) -> None:
        self.query_one(EstimatesPlot).show(fit)
        self.query_one(SettlePlot).show(fit)
        self.query_one(KGrid).show(fit.model.K if self.k_colors else None, self.k_colors)

    def watch_allocation(self, allocation: Allocation) -> None:
        phi = tuple(map(float, self.fit.model.phi))
        self.query_one("#layer-map", LayerMap).show(allocation.bits_per_layer, phi)
        self.query_one("#budget-strip", LayerMap).show(allocation.bits_per_layer, phi)
        self._show_budget()
        self.query_one(FrontierPlot).show(bits=self.bits, y=allocation.predicted_delta_nll)

    def watch_frontier(self, points: list[FrontierPoint]) -> None:
        self.query_one(FrontierPlot).show(points, self.bits, self._marker_y())

    @property
    def is_current(self) -> bool:
        """Everything on screen reflects the run on disk and the budget held now (for
        tests and the screenshot script, which wait for it)."""
        if self.snapshot is None:
            return False
        if not len(self.D) or self.costs is None:
            return True
        return (not self.solving and self.fit is not None and self.fit.samples == len(self.D)
                and self.allocation is not None and self.allocation.target_bits == self.bits)

    @property
    def allocations(self) -> analysis.Allocations | None:
        """The cache of solved allocations, once the layer costs are known."""
        if self._allocations is None and self.costs is not None:
            self._allocations = analysis.Allocations(self.costs, paired=self.config.antithetic)
        return self._allocations

    def _solve(self) -> None:
        """Fit the samples and solve at the budget, in a worker. One solve at a time: a
        newer budget or sample cancels the one in flight (its answer would be stale, and
        SCIP finishes the solve it is in) and starts when it has ended, so keys pressed
        faster than SCIP solves skip the budgets passed over instead of piling up threads
        that would leave the screen a fraction of the GIL."""
        if self.costs is None or not len(self.D):
            return
        self.solving = True
        if self._solve_worker is not None:
            self._solve_worker.cancel()
            self._solve_pending = True
            return
        D, bits, allocations, of = self.D.copy(), self.bits, self.allocations, self.D
        # a new budget on the same samples keeps their fit (and the plots drawn from it)
        fitted = (self.fit, self.k_colors) if self._fit_of is of and self.fit is not None else None

        def fit_and_solve() -> None:
            worker = get_current_worker()
            try:
                if fitted is None:
                    fit = analysis.fit(D, paired=allocations.paired)
                    colors = diverging_colors(fit.model.K) if np.any(fit.model.K) else None
                else:
                    fit, colors = fitted
                allocation = allocations.get(D, bits, fit.model)
                if worker.is_cancelled:
                    return
                self.post_message(Fitted(fit, bits, allocation, colors, of))
                unchanged = analysis.unchanged_for(D, allocations, bits,
                                                   cancelled=lambda: worker.is_cancelled)
                if not worker.is_cancelled:
                    self.post_message(Stability(len(D), bits, unchanged))
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
        if message.bits != self.bits or message.of is not self.D:
            return    # a newer budget or sample is being solved
        self.solving = False
        self._fit_of = message.of
        if message.fit is not self.fit:
            self.k_colors = message.colors
            self.fit = message.fit
        self.allocation = message.allocation
        self._when_idle()

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
        if message.bits == self.bits and message.samples == len(self.D):
            self.unchanged = message.unchanged

    def _maybe_frontier(self) -> None:
        """41 solves, coarse budgets first (analysis.frontier_progress), drawn as they come:
        worth it when the frontier is on screen, or when no run competes for the CPU. New
        samples make the one in work stale: it is cancelled and the new one starts; a
        complete frontier is kept per sample count. The solve at the budget and its
        stability check go first: the frontier waits while they run."""
        if self.allocations is None or not len(self.D) or self._frontier_of is self.D:
            return
        if self._frontier_worker is not None:
            self._frontier_worker.cancel()      # of older samples: stale
            self._frontier_worker = None
        if self.query_one(TabbedContent).active != "frontier" and self.writer is not None:
            return
        D, allocations = self.D, self.allocations
        self._frontier_of = D
        if len(D) in self._frontiers:
            self.frontier = self._frontiers[len(D)]
            return

        def frontier() -> None:
            worker = get_current_worker()

            def cancelled() -> bool:
                # one solver thread at a time: two would leave the screen a third of the GIL
                while self._solver_busy and not worker.is_cancelled:
                    time.sleep(0.02)
                return worker.is_cancelled

            for points, complete in analysis.frontier_progress(D, allocations, cancelled=cancelled):
                self.post_message(FrontierReady(len(D), points, complete))

        self._frontier_worker = self.app.run_worker(frontier, name="frontier", group="frontier",
                                                    exclusive=True, thread=True, exit_on_error=False)

    @property
    def _solver_busy(self) -> bool:
        """The solve at the budget, or its stability check, is in work."""
        return self.solving or self._solve_worker is not None

    def on_frontier_ready(self, message: FrontierReady) -> None:
        if message.samples != len(self.D):
            return       # stale: a newer frontier is in work
        if message.complete:
            self._frontiers[message.samples] = message.points
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
        self.bits = analysis.clamp_bits(bits)

    def action_budget(self, step: float) -> None:
        self.set_bits(self.bits + step)

    def action_ask_budget(self) -> None:
        from impq_tui.screens.modals import NumberModal

        def chosen(bits: float | None) -> None:
            if bits is not None:
                self.set_bits(bits)

        self.app.push_screen(NumberModal("Average bits per weight (2.00 to 4.00)", f"{self.bits:.2f}",
                                         minimum=2.0, maximum=4.0), chosen)

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
        pane.show(state=self.state, detail=detail, done=len(self.D), total=config.samples,
                  progress=snap.progress, summary=summary, age_s=self._progress_age(snap))

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
        self.query_one(BudgetPane).show(
            bits=self.bits, allocation=self.allocation, full_bytes=full,
            dtype=config.dtype if config else "", solving=self.solving, unchanged=self.unchanged,
            relative_se=self.fit.settle[-1] if self.fit and self.fit.settle else None,
            samples=len(self.D),
            budget_bytes=budget_bytes(self.costs, self.bits) if self.costs is not None else None,
            noise=analysis.noise_note(self.fit, self.allocation) if self.fit is not None else None)

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

        self.app.push_screen(NumberModal(f"Continue SPQE until how many samples? ({done} done)",
                                         str(max(self.config.samples, done + 1)),
                                         minimum=done + 1, integer=True), chosen)

    def action_export(self) -> None:
        from impq_tui.screens.export import ExportScreen

        if self.allocation is None:
            self.app.notify("No allocation yet: export needs at least one finished sample.",
                            severity="warning", timeout=4)
            return
        self.app.push_screen(ExportScreen(self.run, self.allocation, self.bits))

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
