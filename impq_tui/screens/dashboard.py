"""The dashboard: SPQE progress, the budget and its allocation, and the views of the
estimates (convergence, bit map, interactions, frontier, log).

Data arrive two ways. A run started here: SPQE runs in a thread worker and its callback
posts messages (never touching widgets). A run opened from disk: a timer watches the
run folder and a worker reads what changed, so a run written by another process is
followed live. Either way the screen keeps D (one row per finished sample) and re-fits
and re-solves in exclusive worker groups; widgets refresh at most four times a second.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from dataclasses import replace

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static, TabbedContent, TabPane, Tabs
from textual.worker import get_current_worker

from core import events
from core.runs import COSTS, RunConfig, RunDir
from core.solver import Allocation, Costs

from impq_tui import analysis
from impq_tui.follow import Snapshot, fingerprint, read_snapshot
from impq_tui.messages import (EngineFinished, EngineLog, EngineProgress, EngineSample, Fitted,
                               CompareDone, FrontierReady, RunPolled, Stability)
from impq_tui.widgets.compare import HINT as COMPARE_HINT, CompareView
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.panes import BudgetPane, BudgetSlider, ProgressPane
from impq_tui.widgets.interactions import KGrid, diverging_colors, scale_legend
from impq_tui.widgets.plots import EstimatesPlot, FrontierPlot, SettlePlot

REFRESH_S = 0.25          # widgets redraw at most this often
POLL_EVERY = 4            # ticks between looks at a followed run folder (1 s)
VIEWS = ("estimates", "bits", "interactions", "frontier", "compare", "log")
BUDGET = Binding.Group("Budget", compact=True)


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
        Binding("n", "new_run", "New"),
        *(Binding(str(i), f"view('{v}')", f"view {v}", show=False) for i, v in enumerate(VIEWS, 1)),
        Binding("up", "scroll_log(-1)", "scroll the log or K", show=False),
        Binding("down", "scroll_log(1)", "scroll the log or K", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, run: RunDir, *, engine_config: RunConfig | None = None,
                 created: bool = False, bits: float = 3.0) -> None:
        super().__init__()
        self.run = run
        self.config = run.config
        self.created = created
        self.bits = analysis.clamp_bits(bits)
        self.rows: dict[int, tuple[float, ...]] = {r["m"]: tuple(r["d"]) for r in run.finite_samples()}
        self.D = self._matrix()
        self.costs: Costs | None = run.costs() if run.has(COSTS) else None
        self.fit: analysis.Fit | None = None
        self.allocation: Allocation | None = None
        self.unchanged: int | None = None
        self.frontier: list[analysis.FrontierPoint] | None = None
        self.progress: events.Progress | None = None
        self.state = "opened"
        self.status: dict | None = None
        self.writer_pid: int | None = None
        # the engine, when SPQE runs in this process
        self.engine_config = engine_config
        self.engine_worker = None
        self.cancel = threading.Event()
        self.pause = threading.Event()       # set: the engine waits between evaluations
        self._silenced = False               # quitting: the engine's events go nowhere
        self.discarded = False               # the run folder was removed (failed at once)
        self._watching = engine_config is None   # polling the folder: no engine of ours writes it
        # what the next tick redraws or recomputes
        self._dirty_progress = True
        self._dirty_data = len(self.D) > 0
        self._solving = False
        self._allocations: analysis.Allocations | None = None
        self._version = 0                    # bumped whenever D changes
        self._frontier_version: int | None = None
        self._frontier_worker = None
        self._ticks = 0
        self._seen = None
        self._log_lines = 0
        # a comparison with the baselines (`c`), in its own thread worker
        self.compare_cancel = threading.Event()
        self.compare_worker = None
        self.compare_result = None

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield ProgressPane(id="progress")
        yield BudgetPane(id="budget")
        with TabbedContent(initial="estimates", id="views"):
            with TabPane("1 Estimates", id="estimates"):
                with Horizontal(id="estimates-row"):
                    yield EstimatesPlot(id="estimates-plot")
                    yield SettlePlot(id="settle-plot")
                yield Static(id="settle-detail")
            with TabPane("2 Bits", id="bits"):
                with Vertical(id="bits-box"):
                    yield LayerMap(id="layer-map")
                    yield Static(id="layer-detail")
            with TabPane("3 Interactions", id="interactions"):
                with Horizontal(id="interactions-row"):
                    with VerticalScroll(id="k-scroll"):
                        yield KGrid(id="k-grid")
                    yield Static(id="interaction-detail")
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
        self.set_interval(REFRESH_S, self._tick)
        if self.engine_config is not None:
            self.start_engine(self.engine_config)
        else:
            self._seen = fingerprint(self.run)
            self._apply_snapshot(read_snapshot(self.run))
        self._refresh_budget()
        self._show_saved_comparison()
        self._tick()

    def on_unmount(self) -> None:
        """However the screen goes (quit, an error, a test that fails), the engine and the
        comparison stop: a paused engine thread left behind would keep the process alive."""
        self._silenced = True
        self.cancel.set()
        self.compare_cancel.set()
        self.pause.clear()

    # ------------------------------------------------------------------ the engine
    def start_engine(self, config: RunConfig) -> None:
        self.engine_config = config
        self._watching = False
        self.cancel.clear()
        self.pause.clear()
        self.state = "preparing"
        self._dirty_progress = True
        self.engine_worker = self.app.run_worker(
            self._engine_work, name="spqe", group="engine", thread=True, exit_on_error=False,
            description=f"SPQE on {config.model}")
        self.refresh_bindings()

    @property
    def engine_running(self) -> bool:
        return self.engine_worker is not None and self.engine_worker.is_running

    def _engine_work(self) -> str:
        from core.engine import run_spqe

        return run_spqe(self.engine_config, self.run, self._on_engine_event, self.cancel, self.pause)

    def _on_engine_event(self, event: events.Event) -> None:
        """Called on the engine thread: only post messages from here."""
        if self._silenced:
            return
        message = None
        if isinstance(event, events.Progress):
            message = EngineProgress(event)
        elif isinstance(event, events.SampleDone):
            message = EngineSample(event)
        elif isinstance(event, events.Log):
            message = EngineLog(event.message, event.level)
        elif isinstance(event, events.Failed):
            message = EngineLog(event.message, "error")
        elif isinstance(event, events.Finished):
            message = EngineFinished(event.status, event.samples)
        if message is not None:
            try:
                self.post_message(message)
            except RuntimeError:
                pass   # the app's loop closed while quitting; the run on disk is what counts

    def on_engine_progress(self, message: EngineProgress) -> None:
        self.progress = message.progress
        if self.state == "preparing":
            self.state = "running"
        self._dirty_progress = True

    def on_engine_sample(self, message: EngineSample) -> None:
        sample = message.sample
        if not sample.finite:
            return     # flagged on disk and out of the estimates; the engine's warning says why
        self.rows[sample.index] = tuple(sample.d)
        self.D = self._matrix()
        self._version += 1
        if self.costs is None:
            self.costs = self.run.costs()
            self.config = self.run.config    # the engine filled in the model's name
        self._dirty_data = self._dirty_progress = True
        self.log_line(f"sample {sample.index} done: v(all 4-bit) {sample.v_high:.4f}, "
                      f"v(all 2-bit) {sample.v_low:.4f} nats/token")

    def on_engine_log(self, message: EngineLog) -> None:
        self.log_line(message.message, message.level)
        if self.state == "preparing":
            self._dirty_progress = True
            self._last_log = message.message

    def on_engine_finished(self, message: EngineFinished) -> None:
        self.state = message.status
        self._dirty_progress = True
        self.refresh_bindings()

    def engine_ended(self, failed: bool) -> bool:
        """The engine's worker is done (any state): from now on, watch the folder. A run
        this screen created that failed before its first sample is removed, as
        `impq-tui run` does; returns True then, so that the app goes back to the form
        for the input to be fixed."""
        if failed:
            self.state = "failed"
            self._dirty_progress = True
        self._seen = fingerprint(self.run)
        self._watching = True
        self._log_lines = self._log_length()    # the engine's lines are on screen already
        self.refresh_bindings()
        if failed and self.created and not self.rows:
            self.discarded = True
            self._watching = False
            self.run.unlock()
            shutil.rmtree(self.run.path, ignore_errors=True)
            return True
        return False

    def stop_engine(self) -> None:
        self.cancel.set()
        self.pause.clear()
        if self.engine_running:
            self.state = "stopping"
            self._dirty_progress = True
        self.refresh_bindings()

    # ------------------------------------------------------------------ a followed run
    def _poll(self) -> None:
        seen = fingerprint(self.run)
        if seen != self._seen:
            self._seen = seen
            self._poll_work()

    def _poll_work(self) -> None:
        def poll() -> None:
            snapshot = read_snapshot(self.run)
            if not get_current_worker().is_cancelled:
                self.post_message(RunPolled(snapshot))

        self.app.run_worker(poll, name="poll", group="poll", exclusive=True, thread=True,
                            exit_on_error=False)

    def on_run_polled(self, message: RunPolled) -> None:
        self._apply_snapshot(message.snapshot)

    def _apply_snapshot(self, snap: Snapshot) -> None:
        if len(snap.D) != len(self.D) or (len(snap.D) and not np.array_equal(snap.D, self.D)):
            self.D = snap.D
            self.rows = {m: tuple(row) for m, row in zip(snap.indices, snap.D)}
            self._version += 1
            self._dirty_data = True
        if self.costs is None and snap.costs_ready:
            self.costs = self.run.costs()
            self._dirty_data = len(self.D) > 0
        self.config = self.run.config
        self.status = snap.status
        self.writer_pid = snap.writer.pid if snap.writer.alive else None
        state = (snap.status or {}).get("state")
        if snap.writer.alive:
            self.state = "following"
            self.progress = snap.progress
        elif state == "running":
            self.state = "interrupted"
        elif state in ("completed", "cancelled", "failed"):
            self.state = state
        else:
            self.state = "opened"
        if self.state != "following" and snap.progress is not None:
            self.progress = snap.progress
        self._show_log_tail()
        self._dirty_progress = True
        self.refresh_bindings()

    def _log_length(self) -> int:
        try:
            return len((self.run.path / "events.log").read_text().splitlines())
        except OSError:
            return 0

    def _show_log_tail(self) -> None:
        try:
            lines = (self.run.path / "events.log").read_text().splitlines()
        except OSError:
            return
        for line in lines[self._log_lines:]:
            self.log_line(line)
        self._log_lines = len(lines)

    # ------------------------------------------------------------------ fitting and solving
    def _tick(self) -> None:
        if self.discarded:
            return
        self._ticks += 1
        if self._watching and self._ticks % POLL_EVERY == 0:
            self._poll()
        if self._dirty_data and self.costs is not None and len(self.D):
            self._dirty_data = False
            self._fit_work(self.D.copy(), self.bits)
        if self._frontier_due():
            self._frontier_work(self.D.copy())
        if self._dirty_progress:
            self._dirty_progress = False
            self._refresh_progress()

    @property
    def is_current(self) -> bool:
        """Everything on screen reflects the samples and budget held now (for tests and
        the screenshot script, which wait for it)."""
        if not len(self.D) or self.costs is None:
            return not self._dirty_data
        return (not self._dirty_data and not self._solving and self.fit is not None
                and self.fit.samples == len(self.D) and self.allocation is not None
                and self.allocation.target_bits == self.bits)

    @property
    def allocations(self) -> analysis.Allocations | None:
        """The cache of solved allocations, once the layer costs are known."""
        if self._allocations is None and self.costs is not None:
            self._allocations = analysis.Allocations(self.costs, paired=self.config.antithetic)
        return self._allocations

    def _fit_work(self, D: np.ndarray, bits: float) -> None:
        self._solving = True
        self._refresh_budget()
        allocations = self.allocations

        def fit_and_solve() -> None:
            worker = get_current_worker()
            fit = analysis.fit(D, paired=allocations.paired)
            allocation = allocations.get(D, bits, fit.model)
            colors = diverging_colors(fit.model.K) if np.any(fit.model.K) else None
            if worker.is_cancelled:
                return
            self.post_message(Fitted(fit, bits, allocation, colors))
            unchanged = analysis.unchanged_for(D, allocations, bits,
                                               cancelled=lambda: worker.is_cancelled)
            if not worker.is_cancelled:
                self.post_message(Stability(len(D), bits, unchanged))

        # exclusive: a newer budget or sample makes this answer stale, so cancel it
        self.app.run_worker(fit_and_solve, name="solve", group="solve", exclusive=True,
                            thread=True, exit_on_error=False)

    def _frontier_due(self) -> bool:
        """41 solves: worth it when the frontier is on screen, or when no engine competes
        for the CPU; one at a time, never cancelled by a newer sample (it would starve)."""
        if self.allocations is None or not len(self.D) or self._frontier_version == self._version:
            return False
        if self._frontier_worker is not None and self._frontier_worker.is_running:
            return False
        return (self.query_one(TabbedContent).active == "frontier" or not self.engine_running)

    def _frontier_work(self, D: np.ndarray) -> None:
        allocations = self.allocations
        self._frontier_version = self._version

        def frontier() -> None:
            points = analysis.frontier_points(D, allocations)
            self.post_message(FrontierReady(len(D), points))

        self._frontier_worker = self.app.run_worker(frontier, name="frontier", group="frontier",
                                                    thread=True, exit_on_error=False)

    def on_fitted(self, message: Fitted) -> None:
        if message.bits != self.bits or message.fit.samples != len(self.D):
            return    # a newer budget or sample is being solved
        self._solving = False
        self.fit, self.allocation = message.fit, message.allocation
        if self.unchanged is not None and message.fit.samples != getattr(self, "_unchanged_m", None):
            self.unchanged = None
        phi = tuple(map(float, message.fit.model.phi))
        self.query_one("#layer-map", LayerMap).show(message.allocation.bits_per_layer, phi)
        self.query_one("#budget-strip", LayerMap).show(message.allocation.bits_per_layer, phi)
        self.query_one(EstimatesPlot).show(message.fit)
        self.query_one(SettlePlot).show(message.fit)
        self.query_one(KGrid).show(message.fit.model.K if message.colors else None, message.colors)
        self._refresh_interaction_detail()
        self._refresh_layer_detail()
        self._refresh_budget()
        self._refresh_settle_detail()
        self.query_one(FrontierPlot).show(bits=self.bits, y=message.allocation.predicted_delta_nll)

    def on_stability(self, message: Stability) -> None:
        if message.bits == self.bits and message.samples == len(self.D):
            self.unchanged = message.unchanged
            self._unchanged_m = message.samples
            self._refresh_budget()
            self._refresh_settle_detail()

    def on_frontier_ready(self, message: FrontierReady) -> None:
        self.frontier = message.points
        self.query_one(FrontierPlot).show(message.points, self.bits, self._marker_y())

    def _marker_y(self) -> float | None:
        a = self.allocation
        return a.predicted_delta_nll if a is not None and a.target_bits == self.bits else None

    # ------------------------------------------------------------------ the budget
    def set_bits(self, bits: float) -> None:
        bits = analysis.clamp_bits(bits)
        if bits == self.bits:
            return
        self.bits = bits
        self.unchanged = None
        if self.costs is not None and len(self.D):
            self._fit_work(self.D.copy(), bits)
        self._refresh_budget()
        self.query_one(FrontierPlot).show(bits=bits, y=self._marker_y())

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
        self.query_one("#layer-map", LayerMap).picked = event.layer
        self._refresh_layer_detail()

    # ------------------------------------------------------------------ redrawing
    def _refresh_progress(self) -> None:
        total = self.engine_config.samples if self.engine_config else self.config.samples
        detail = self._describe()
        config = self.engine_config or self.config
        summary = (f"{config.device} · {config.dtype} · calibration {config.windows} × "
                   f"{config.window_tokens} tokens of {config.calib_text} · seed {config.seed}"
                   + (" · antithetic" if config.antithetic else ""))
        if self.state == "preparing" and getattr(self, "_last_log", None):
            summary = self._last_log
        if self.state == "following" and self.writer_pid:
            detail = f"{detail} · written by pid {self.writer_pid}"
        elif self.state == "failed" and self.status and self.status.get("message"):
            detail = f"{detail} · {self.status['message']}"
        self.query_one(ProgressPane).show(state=self.state, detail=detail, done=len(self.D),
                                          total=total, progress=self.progress, summary=summary)

    def _describe(self) -> str:
        config = self.engine_config or self.config
        name = self.config.model_name or config.model
        return f"{name} · {config.backend} · {self.run.path}"

    def _refresh_budget(self) -> None:
        full = analysis.full_precision_bytes(self.costs, self.config.dtype) if self.costs else None
        self.query_one(BudgetPane).show(
            bits=self.bits, allocation=self.allocation, full_bytes=full, dtype=self.config.dtype,
            solving=self._solving, unchanged=self.unchanged,
            relative_se=self.fit.settle[-1] if self.fit and self.fit.settle else None,
            samples=len(self.D))

    def _refresh_settle_detail(self) -> None:
        fit = self.fit
        if fit is None:
            return
        parts = [f"{fit.samples} samples"]
        if fit.settle:
            parts.append(f"max se/|φ| {fit.settle[-1]:.2f}")
        if self.unchanged is not None:
            window = min(len(self.D) - 1, analysis.STABILITY_WINDOW)
            parts.append(f"the allocation at {self.bits:.2f} bits is unchanged by the last "
                         f"{self.unchanged} of {window} samples")
        self.query_one("#settle-detail", Static).update(" · ".join(parts))

    def _refresh_layer_detail(self) -> None:
        detail = self.query_one("#layer-detail", Static)
        if self.fit is None or self.allocation is None or self.costs is None:
            detail.update("")
            return
        picked = self.query_one("#layer-map", LayerMap).picked
        m = self.fit.model
        a = self.allocation
        high = sum(b == 4 for b in a.bits_per_layer)
        lines = [f"[b]{high}[/b] of {len(a.bits_per_layer)} layers at 4 bits, "
                 f"{len(a.bits_per_layer) - high} at 2 bits; φ in nats/token from {m.samples} "
                 "samples. Click a cell for its numbers."]
        if picked is not None and picked < len(m.phi):
            i = picked
            lines.append(f"layer {i}: {a.bits_per_layer[i]} bits · φ {m.phi[i]:+.5f} ± "
                         f"{m.se[i]:.5f} · a {m.a[i]:+.5f} · {analysis.fmt_bytes(self.costs.m_lo[i])} "
                         f"at 2 bits, {analysis.fmt_bytes(self.costs.m_hi[i])} at 4 bits")
        detail.update("\n".join(lines))

    def _refresh_interaction_detail(self) -> None:
        detail = self.query_one("#interaction-detail", Static)
        if self.fit is None or not np.any(self.fit.model.K):
            detail.update("")
            return
        K = self.fit.model.K
        text = Text("K: covariance of the marginal vectors, shrunk to its diagonal "
                    "(α 0.5), nats². Colours end at the largest pair; the diagonal (variances) "
                    "saturates.\n\n", "dim")
        text.append_text(scale_legend(K))
        text.append("\n\nstrongest pairs i×j\n", "bold")
        for i, j, k in analysis.top_interactions(K, 5):
            text.append(f"{i:>3} × {j:<3} {k:+.2e}\n")
        detail.update(text)

    def log_line(self, text: str, level: str = "info") -> None:
        from rich.text import Text

        style = {"error": "bold red", "warning": "yellow"}.get(level, "")
        self.query_one("#log-view", RichLog).write(Text(text, style=style))

    def _matrix(self) -> np.ndarray:
        if not self.rows:
            return np.empty((0, 0))
        return np.asarray([self.rows[m] for m in sorted(self.rows)], dtype=np.float64)

    # ------------------------------------------------------------------ actions
    def check_action(self, action: str, parameters: tuple) -> bool | None:
        running = self.engine_running
        if action == "pause":
            return running and not self.pause.is_set() and not self.cancel.is_set()
        if action == "resume":
            return running and self.pause.is_set() and not self.cancel.is_set()
        if action == "stop":
            return (running and not self.cancel.is_set()) or (not running and self.writer_pid is not None)
        if action == "continue_run":
            return not running and self.writer_pid is None
        if action == "new_run":
            return None if running else True
        if action == "compare":
            # greyed while SPQE runs here (both would compete for the device) or one runs
            return None if running or self.compare_running or not len(self.D) else True
        return True

    def action_pause(self) -> None:
        self.pause.set()
        self.state = "paused"
        self._refresh_progress()      # at once: a key press deserves an answer before the next tick
        self.refresh_bindings()

    def action_resume(self) -> None:
        self.pause.clear()
        self.state = "running" if self.progress else "preparing"
        self._refresh_progress()
        self.refresh_bindings()

    def action_stop(self) -> None:
        if self.engine_running:
            self.stop_engine()
        elif self.writer_pid is not None:
            # another process of ours writes this run: SIGTERM stops it between evaluations
            try:
                os.kill(self.writer_pid, signal.SIGTERM)
                self.app.notify(f"asked pid {self.writer_pid} to stop", timeout=3)
            except OSError as exc:
                self.app.notify(f"could not signal pid {self.writer_pid}: {exc}", severity="error")

    def action_continue_run(self) -> None:
        from impq_tui.screens.modals import NumberModal

        target = max(self.config.samples, len(self.D) + 1)

        def chosen(samples: float | None) -> None:
            if samples is not None:
                config = replace(self.run.config, samples=int(samples))
                self.run.update_config(config)
                self.created = False
                self.start_engine(config)

        self.app.push_screen(NumberModal(f"Continue SPQE until how many samples? ({len(self.D)} done)",
                                         str(target), minimum=len(self.D) + 1, integer=True), chosen)

    def action_export(self) -> None:
        from impq_tui.screens.export import ExportScreen

        if self.allocation is None:
            self.app.notify("No allocation yet: export needs at least one finished sample.",
                            severity="warning", timeout=4)
            return
        self.app.push_screen(ExportScreen(self.run, self.allocation, self.bits))

    # ------------------------------------------------------------------ the comparison
    @property
    def compare_running(self) -> bool:
        return self.compare_worker is not None and self.compare_worker.is_running

    def compare_bits(self) -> list[float]:
        from core.compare import DEFAULT_BITS

        return sorted({*DEFAULT_BITS, round(self.bits, 2)} - {2.0, 4.0})

    def _show_saved_comparison(self) -> None:
        from core.compare import load_saved
        from core.errors import UserError

        view = self.query_one(CompareView)
        try:
            saved = load_saved(self.run, self.config.backend)
        except UserError as e:
            view.show_status(str(e), "yellow")
            return
        if saved is None:
            bits = ", ".join(f"{b:g}" for b in self.compare_bits())
            view.show_status(COMPARE_HINT.format(bits=bits, run=self.run.path), "dim")
        else:
            self.compare_result = saved
            view.show_status(f"saved comparison ({self.run.path / 'compare'}); c runs it again "
                             f"with the run's {len(self.D)} samples", "dim")
            view.show_result(saved)

    def action_compare(self) -> None:
        from core.compare import compare

        bits = self.compare_bits()
        self.compare_cancel.clear()
        self.action_view("compare")     # the key's answer is on screen at once
        self.query_one(CompareView).show_status(
            f"comparing at {', '.join(f'{b:g}' for b in bits)} bits with {len(self.D)} samples "
            "(progress in the log, 6)…", "bold")
        run, cancel = self.run, self.compare_cancel

        def work() -> None:
            from core.errors import UserError
            from core.spqe import Cancelled

            def callback(event) -> None:
                if isinstance(event, events.Log) and not self._silenced:
                    self.post_message(EngineLog(f"compare: {event.message}", event.level))

            try:
                result, error = compare(run, bits, callback=callback, cancel=cancel), None
            except Cancelled:
                result, error = None, "comparison stopped; nothing was written"
            except UserError as e:
                result, error = None, str(e)
            except Exception as e:   # out of memory and the like: a message, not a traceback
                result, error = None, f"comparison failed: {type(e).__name__}: {e}"
            if not self._silenced:
                self.post_message(CompareDone(result, error))

        self.compare_worker = self.app.run_worker(work, name="compare", group="compare",
                                                  exclusive=True, thread=True, exit_on_error=False)
        self.refresh_bindings()

    def on_compare_done(self, message: CompareDone) -> None:
        view = self.query_one(CompareView)
        if message.error is not None:
            view.show_status(message.error, "bold red")
            self.log_line(message.error, "error")
            self.app.notify(message.error, severity="error", timeout=6)
        else:
            self.compare_result = message.result
            view.show_status(f"compared {len(message.result.results)} allocations in "
                             f"{message.result.timings['total_s']:.0f} s; saved in "
                             f"{self.run.path / 'compare'}", "green")
            view.show_result(message.result)
        self.compare_worker = None
        self.refresh_bindings()

    async def action_quit(self) -> None:
        await self.app.action_quit()

    def action_new_run(self) -> None:
        self.app.new_run(self)

    def action_view(self, view: str) -> None:
        self.query_one(TabbedContent).active = view

    def action_scroll_log(self, lines: int) -> None:
        view = {"log": "#log-view", "interactions": "#k-scroll", "compare": "#compare-view"}.get(self.query_one(TabbedContent).active)
        if view:
            self.query_one(view).scroll_relative(y=lines, animate=False)
