"""The Textual app: a setup form, the dashboard of a run, export.

    impq-tui              the runs under ./runs (--runs DIR) to open one, n for a new
                          one; with no runs there, the setup form
    impq-tui --run DIR    the dashboard of a saved run, following it while its process
                          still writes it

A run started from the form is a process of its own (`impq-tui run`), followed on disk
like any other run: it goes on when the terminal closes or the app quits.

Every worker runs on the app with a group, `exit_on_error=False`, and reports errors
through the one Worker.StateChanged handler here, which turns them into a readable modal.
Thread workers are daemon threads, so quitting never waits for a solve or a comparison.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import shutil
import sys
import threading
from typing import NoReturn

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from core.errors import UserError
from core.runs import RunConfig, RunDir

from impq_tui.follow import RunSource
from impq_tui.screens.dashboard import VIEWS, Dashboard
from impq_tui.screens.modals import ErrorModal, HelpScreen, LeaveRunModal
from impq_tui.screens.picker import RunInfo, RunPicker, RunScan
from impq_tui.screens.setup import SetupDefaults, SetupScreen
from impq_tui.solver_process import SolverProcess

WORKER_TITLES = {
    "solve": "The solver failed",
    "frontier": "The frontier could not be computed",
    "impq-fit": "IMPQ-fit's model could not be fitted",
    "follow": "The run folder could not be read",
    "export": "Export or evaluation failed",
    "runs": "The runs folder could not be read",
    "estimate": "The duration could not be estimated",
}


def readable(error: BaseException) -> str:
    """What a user can act on. UserError messages already say what to do; anything else
    is named, with the advice that fits the few crashes a user can cause."""
    if isinstance(error, UserError):
        return str(error)
    name = type(error).__name__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if "OutOfMemory" in name or "out of memory" in text.lower():
        return (f"Out of memory ({name}: {text}). Lower the calibration size (windows × tokens "
                "per window), use a smaller model, or free the GPU, then continue the run.")
    return (f"{name}: {text}\n\nThis is a bug in impq-tui or a library it uses. Finished samples "
            "are kept in the run folder; the Log view has the details.")


class DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each thread worker on a daemon thread of its own. The event loop's default
    executor joins its threads when the loop closes, so `q` would wait for a comparison
    or an export in flight; their cancel events stop them, this makes sure exit does not
    wait for that. (asyncio takes only a ThreadPoolExecutor; none of its pool is used.)"""

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:   # the worker reports it
                    future.set_exception(exc)

        threading.Thread(target=run, daemon=True, name="impq-worker").start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def _freeze_imports() -> None:
    """Leave the objects made so far (the imported modules of textual, rich, numpy and
    ours: some 50,000) out of the garbage collector's full collections from now on, once
    per process. They live as long as the process anyway; each full collection on the
    event loop then takes about 10 ms instead of 60 (bench/ui_latency.py)."""
    if not gc.get_freeze_count():
        gc.freeze()


class ImpqApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "impq-tui"
    BINDINGS = [
        Binding("f1,question_mark", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, run_dir: str | None = None, *, runs: str | None = None,
                 setup: SetupDefaults | None = None, bits: float = 3.0,
                 cursor_blink: bool = True, timings: bool = True) -> None:
        """runs: the folder whose runs the app lists first (None: the form comes first);
        setup: the form's defaults; bits: the budget a dashboard starts at;
        cursor_blink and timings (solver times) off make screenshots repeatable."""
        super().__init__()
        self.run_dir = run_dir
        self.runs_folder = runs
        self.known_runs: list[RunInfo] = []    # the latest scan (the form's estimate uses it)
        self.setup_defaults = setup
        self.start_bits = bits
        self.cursor_blink = cursor_blink
        self.timings = timings
        self.animation_level = "none"      # nothing slides or fades over SSH
        # The run's solver process, started with the app so that its imports overlap the
        # app's start; its dashboard takes it over (open_run).
        self._solver: SolverProcess | None = SolverProcess() if run_dir else None

    def on_unmount(self) -> None:
        if self._solver is not None:      # started for a run that did not open
            self._solver.close()

    def on_mount(self) -> None:
        from impq_tui.libraries import quiet_libraries

        _freeze_imports()
        asyncio.get_running_loop().set_default_executor(DaemonExecutor())
        quiet_libraries()     # no library progress bars drawn over the screen
        if self.run_dir:
            try:
                self.open_run(self.run_dir)
                return
            except UserError as exc:
                if self._solver is not None:
                    self._solver.close()
                    self._solver = None
                self.push_screen(SetupScreen(self._defaults(run_dir=self.run_dir)))
                self.show_error("Cannot open the run", str(exc))
                return
        if self.runs_folder is not None:
            self._first_scan(RunScan(self.runs_folder))
            return
        self.push_screen(SetupScreen(self._defaults()))

    @work(thread=True, group="runs", exit_on_error=False)
    def _first_scan(self, scanner: RunScan) -> None:
        """The runs folder read off the event loop; the picker or, with no runs, the form."""
        runs = scanner.scan()
        self.call_from_thread(self.call_later, self._first_screen, scanner, runs)

    def _first_screen(self, scanner: RunScan, runs: list[RunInfo]) -> None:
        self.known_runs = runs
        if runs:
            self.push_screen(RunPicker(self.runs_folder, scanner=scanner, runs=runs))
        else:
            self.push_screen(SetupScreen(self._defaults()))

    def _defaults(self, **changes) -> SetupDefaults:
        from dataclasses import replace

        return replace(self.setup_defaults or SetupDefaults(), **changes)

    # ------------------------------------------------------------------ screens
    @property
    def dashboard(self) -> Dashboard | None:
        for screen in reversed(self.screen_stack):
            if isinstance(screen, Dashboard):
                return screen
        return None

    def start_run(self, config: RunConfig, path: str) -> Dashboard:
        """Create the run folder (refusing a non-empty one), start `impq-tui run` on it in
        a process of its own, and follow it."""
        try:
            run = RunDir.create(path, config)
        except OSError as exc:          # below a file, unwritable, too long...
            raise UserError(f"cannot create the run folder {path!r}: {exc.strerror or exc}. "
                            "Choose another Run folder.") from None
        run.unlock()                    # the run's process takes the lock
        source = RunSource(run)
        try:
            source.start()
        except OSError as exc:
            shutil.rmtree(run.path, ignore_errors=True)
            raise UserError(f"cannot start the run's process: {exc}") from None
        dashboard = Dashboard(source, created=True, bits=self.start_bits)
        self.push_screen(dashboard)
        return dashboard

    def open_run(self, path: str) -> Dashboard:
        run = RunDir.open(path)
        run.samples()       # a damaged samples.jsonl is reported here, not later
        solver, self._solver = self._solver, None
        dashboard = Dashboard(RunSource(run), bits=self.start_bits, solver=solver)
        self.push_screen(dashboard)
        return dashboard

    def new_run(self, dashboard: Dashboard) -> None:
        index = self.screen_stack.index(dashboard)
        if index > 0 and isinstance(self.screen_stack[index - 1], SetupScreen):
            self.pop_screen()
        else:
            self.switch_screen(SetupScreen(self._defaults()))

    def new_run_form(self) -> None:
        """The setup form over the picker (escape goes back to the list)."""
        self.push_screen(SetupScreen(self._defaults()))

    def show_runs(self) -> None:
        """Back to the list of runs, or the list of the runs folder (./runs unless given)."""
        for depth, screen in enumerate(reversed(self.screen_stack)):
            if isinstance(screen, RunPicker):
                for _ in range(depth):
                    self.pop_screen()
                screen.rescan()
                return
        self.push_screen(RunPicker(self.runs_folder or "runs"))

    def show_error(self, title: str, message: str, then=None) -> None:
        self.push_screen(ErrorModal(title, message), then)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.screen))

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Keys and what the panes mean", self.action_help)
        if isinstance(screen, SetupScreen):
            yield SystemCommand("Start run", "Start SPQE with this form (F5)", screen.action_start)
        if isinstance(screen, RunPicker):
            yield SystemCommand("New run", "The setup form (n)", self.new_run_form)
        else:
            yield SystemCommand("Open run…", f"The runs in {self.runs_folder or 'runs'}: pick one",
                                self.show_runs)
        if isinstance(screen, Dashboard):
            yield SystemCommand("Set the budget…", "Type an average of bits per weight",
                                screen.action_ask_budget)
            yield SystemCommand("Export…", "Evaluate and export this allocation", screen.action_export)
            yield SystemCommand("Next allocation model",
                                "IMPQ (paper), IMPQ-local, IMPQ-fit (our extensions) (m)",
                                screen.action_next_model)
            for key, view in enumerate(VIEWS, 1):
                yield SystemCommand(f"Show {view}", f"key {key}", lambda v=view: screen.action_view(v))

    # ------------------------------------------------------------------ workers
    @on(Worker.StateChanged)
    def _worker_state_changed(self, event: Worker.StateChanged) -> None:
        # event.state, not worker.state: a worker that fails at once is already in ERROR
        # while its RUNNING message is still on the way
        if event.state == WorkerState.ERROR:
            worker = event.worker
            self.show_error(WORKER_TITLES.get(worker.group, "Something failed"),
                            readable(worker.error))

    async def action_quit(self) -> None:
        """Quit; while the run on screen is being written by a process of this host, ask
        once whether to leave it running or stop it (quitting again leaves it running)."""
        dashboard = self.dashboard
        writer = dashboard.writer if dashboard is not None else None
        if writer is None or not writer.here or isinstance(self.screen, LeaveRunModal):
            self.exit(0)
            return

        def answered(choice: str | None) -> None:
            if choice == "stop":
                dashboard.stop_run()
            if choice is not None:
                self.exit(0)

        self.push_screen(LeaveRunModal(str(dashboard.run.path), writer.pid), answered)


def run_app(run_dir: str | None = None, runs: str | None = "runs") -> NoReturn:
    """Run the app, then end the process at once. Nothing of the app's is left to finish
    (a run is a process of its own; workers were told to stop and are daemon threads),
    while the interpreter's teardown of torch and the other libraries takes about half a
    second, longer while a worker thread is inside a library call: `q` should be instant."""
    code = ImpqApp(run_dir, runs=runs).run() or 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
