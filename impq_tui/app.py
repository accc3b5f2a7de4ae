"""The Textual app: a setup form, the dashboard of a run, export.

    impq-tui              the setup form
    impq-tui --run DIR    the dashboard of a saved run, following it if another process
                          still writes it

Every worker runs on the app with a group, `exit_on_error=False`, and reports errors
through the one Worker.StateChanged handler here, which turns them into a readable modal.
"""
from __future__ import annotations

import threading
from pathlib import Path

from textual import on
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from core.errors import UserError
from core.runs import RunConfig, RunDir

from impq_tui.screens.dashboard import Dashboard
from impq_tui.screens.modals import ErrorModal, HelpScreen
from impq_tui.screens.setup import SetupDefaults, SetupScreen

WORKER_TITLES = {
    "engine": "SPQE stopped",
    "solve": "The solver failed",
    "frontier": "The frontier could not be computed",
    "poll": "The run folder could not be read",
    "export": "Export or evaluation failed",
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


class ImpqApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "impq-tui"
    BINDINGS = [
        Binding("f1,question_mark", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, run_dir: str | None = None, *, setup: SetupDefaults | None = None,
                 bits: float = 3.0, cursor_blink: bool = True, timings: bool = True) -> None:
        """setup: the form's defaults; bits: the budget a dashboard starts at;
        cursor_blink and timings (solver times) off make screenshots repeatable."""
        super().__init__()
        self.run_dir = run_dir
        self.setup_defaults = setup
        self.start_bits = bits
        self.cursor_blink = cursor_blink
        self.timings = timings
        self.animation_level = "none"      # nothing slides or fades over SSH
        self._quitting = False
        self.engine_threads: list[threading.Thread] = []

    def on_mount(self) -> None:
        from impq_tui.cli import _quiet_libraries

        _quiet_libraries()     # no library progress bars drawn over the screen
        if self.run_dir:
            try:
                self.open_run(self.run_dir, replace_setup=False)
                return
            except UserError as exc:
                self.push_screen(SetupScreen(self._defaults(run_dir=self.run_dir)))
                self.show_error("Cannot open the run", str(exc))
                return
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
        """Create the run folder (refusing a non-empty one) and start SPQE on it."""
        run = RunDir.create(path, config)
        dashboard = Dashboard(run, engine_config=config, created=True, bits=self.start_bits)
        self.push_screen(dashboard)
        return dashboard

    def open_run(self, path: str, replace_setup: bool = True) -> Dashboard:
        run = RunDir.open(path)
        run.samples()       # a damaged samples.jsonl is reported here, not later
        dashboard = Dashboard(run, bits=self.start_bits)
        self.push_screen(dashboard)
        return dashboard

    def new_run(self, dashboard: Dashboard) -> None:
        index = self.screen_stack.index(dashboard)
        if index > 0 and isinstance(self.screen_stack[index - 1], SetupScreen):
            self.pop_screen()
        else:
            self.switch_screen(SetupScreen(self._defaults()))

    def show_error(self, title: str, message: str, then=None) -> None:
        self.push_screen(ErrorModal(title, message), then)

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        self.push_screen(HelpScreen(self.screen))

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help", "Keys and what the panes mean", self.action_help)
        if isinstance(screen, Dashboard):
            yield SystemCommand("Set the budget…", "Type an average of bits per weight",
                                screen.action_ask_budget)
            yield SystemCommand("Export…", "Evaluate and export this allocation", screen.action_export)
            for key, view in enumerate(("estimates", "bits", "interactions", "frontier", "compare", "log"), 1):
                yield SystemCommand(f"Show {view}", f"key {key}", lambda v=view: screen.action_view(v))

    # ------------------------------------------------------------------ workers
    @on(Worker.StateChanged)
    def _worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        # event.state, not worker.state: a worker that fails at once is already in ERROR
        # while its RUNNING message is still on the way
        if event.state not in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            return
        failed = event.state == WorkerState.ERROR
        back_to_form = None
        if worker.group == "engine":
            dashboard = self.dashboard
            if dashboard is not None and dashboard.engine_ended(failed):
                back_to_form = lambda _: self.new_run(dashboard)   # noqa: E731
            if self._quitting:
                self.exit(0)
                return
        if failed:
            if worker.group == "engine" and self.dashboard is not None:
                self.dashboard.log_line(f"{type(worker.error).__name__}: {worker.error}", "error")
            self.show_error(WORKER_TITLES.get(worker.group, "Something failed"),
                            readable(worker.error), back_to_form)

    async def action_quit(self) -> None:
        """Stop the engine between evaluations and wait for it; a second quit leaves at once
        (the engine thread then stops at its next check before the process exits)."""
        dashboard = self.dashboard
        if dashboard is not None and dashboard.engine_running and not self._quitting:
            self._quitting = True
            dashboard.stop_engine()
            self.notify("Stopping SPQE after the evaluation in flight (finished samples are "
                        "saved). Press quit again to leave at once.", timeout=10)
            return
        self.stop_engine()
        self.exit(0)

    def stop_engine(self) -> None:
        for screen in [*self.screen_stack, *getattr(self, "_installed_screens", {}).values()]:
            if isinstance(screen, Dashboard):
                screen.on_unmount()

    def on_unmount(self) -> None:
        self.stop_engine()


def run_app(run_dir: str | None = None) -> int:
    app = ImpqApp(run_dir)
    try:
        result = app.run()
    finally:
        app.stop_engine()
    return result or 0
