"""The Compare view: IMPQ against the isolated baselines at equal memory, as
`impq-tui compare` prints it, from the run's saved compare/<backend>.json or from a
comparison started here with `c` (in a thread worker of its own)."""
from __future__ import annotations

import threading

from rich.console import Group
from rich.text import Text
from textual.containers import VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from core import events
from core.runs import RunDir

from impq_tui.messages import CompareDone, JobStep, LogLine
from impq_tui.report import compare_table, describe_eval
from impq_tui.widgets.panes import JobProgress

HINT = ("Press c to evaluate IMPQ and the four isolated baselines (Sensitivity, LIM, Z-score, "
        "Activation) at the same memory with the real backend's modules: budgets {bits} bits. "
        "Same as `impq-tui compare {run}`; the table and plot are saved in the run's compare/ folder.")


def compare_bits(bits: float) -> list[float]:
    """The preset budgets and the one on screen (the all-2 and all-4 ends are not compared)."""
    from core.results import DEFAULT_BITS

    return sorted({*DEFAULT_BITS, round(bits, 2)} - {2.0, 4.0})


def _listed(bits: list[float]) -> str:
    return ", ".join(f"{b:g}" for b in bits)


class CompareView(VerticalScroll):
    """A status line and the progress of a comparison running, over the comparison table."""

    result = reactive(None, always_update=True)       # the CompareResult shown
    running: reactive[bool] = reactive(False, bindings=True)

    class Saved(Message):
        """What the run's compare/ folder holds (read in a thread): a status and a result."""

        def __init__(self, status: str, style: str, result) -> None:
            super().__init__()
            self.status, self.style, self.result = status, style, result

    class Status(Message):
        """The status line of the comparison running."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cancel = threading.Event()
        self.folder = None      # where the comparison running now is saved
        self.saved_shown = False

    def compose(self):
        yield Static(id="compare-status")
        yield JobProgress(id="compare-progress")
        yield Static(id="compare-table")

    def on_unmount(self) -> None:
        self.cancel.set()

    def show_status(self, text: str, style: str = "") -> None:
        self.query_one("#compare-status", Static).update(Text(text, style=style))

    def watch_result(self, result) -> None:
        if result is None:
            return
        lines = [compare_table(result), Text(describe_eval(result), "dim")]
        lines.extend(Text(f"warning: {w}", "yellow") for w in result.warnings)
        self.query_one("#compare-table", Static).update(Group(*lines))

    # ------------------------------------------------------------------ the saved comparison
    def load_saved(self, run: RunDir, backend: str, samples: int, bits: float) -> None:
        """Read the saved comparison in a thread (reading it imports torch: most of a
        second the screen would otherwise wait)."""
        def work() -> None:
            self.post_message(self.Saved(*saved_status(run, backend, samples, bits)))

        self.run_worker(work, name="compare-saved", group="compare-saved", exclusive=True,
                        thread=True, exit_on_error=False)

    def show_saved(self, run: RunDir, backend: str, samples: int, bits: float) -> None:
        """The saved comparison now (the Compare view shown before the thread read it)."""
        if not self.saved_shown:
            self.on_compare_view_saved(self.Saved(*saved_status(run, backend, samples, bits)))

    def on_compare_view_saved(self, message: "CompareView.Saved") -> None:
        if self.saved_shown or self.running:
            return
        self.saved_shown = True
        self.show_status(message.status, message.style)
        if message.result is not None:
            self.result = message.result

    # ------------------------------------------------------------------ a comparison
    def start(self, run: RunDir, bits: float, samples: int) -> None:
        """Evaluate IMPQ and the baselines at the preset budgets and `bits`, in a thread."""
        self.cancel.clear()
        self.running = True
        self.saved_shown = True      # a saved table read late must not cover this one
        self.show_status(f"comparing with {samples} samples…", "bold")
        self.query_one(JobProgress).start("loading the model")
        cancel = self.cancel
        self.folder = run.path / "compare"

        def work() -> None:
            from core.compare import compare     # imports torch: off the event loop
            from core.errors import UserError
            from core.spqe import Cancelled

            budgets = compare_bits(bits)
            self.post_message(self.Status(f"comparing at {_listed(budgets)} bits with {samples} "
                                          "samples (the log, 6, has the details)…"))

            def callback(event: events.Event) -> None:
                if cancel.is_set():
                    return
                if isinstance(event, events.Step):
                    self.post_message(JobStep(event))
                elif isinstance(event, events.Log):
                    self.post_message(LogLine(f"compare: {event.message}", event.level))

            cancelled = False
            try:
                result, error = compare(run, budgets, callback=callback, cancel=cancel), None
            except Cancelled:
                result, error, cancelled = None, "comparison stopped; nothing was written", True
            except UserError as e:
                result, error = None, str(e)
            except Exception as e:   # out of memory and the like: a message, not a traceback
                result, error = None, f"comparison failed: {type(e).__name__}: {e}"
            self.post_message(CompareDone(result, error, cancelled))

        self.run_worker(work, name="compare", group="compare", exclusive=True, thread=True,
                        exit_on_error=False)

    def stop(self) -> bool:
        """Ask the comparison running to stop (it does within a decoder layer's forward);
        False when none runs."""
        if not self.running:
            return False
        self.cancel.set()
        self.query_one(JobProgress).stopping()
        return True

    def on_compare_view_status(self, message: "CompareView.Status") -> None:
        if self.running and not self.cancel.is_set():
            self.show_status(message.text, "bold")

    def on_job_step(self, message: JobStep) -> None:
        if self.running and not self.cancel.is_set():
            self.query_one(JobProgress).step(message.step)

    def on_compare_done(self, message: CompareDone) -> None:
        self.running = False
        took = self.query_one(JobProgress).stop()
        if message.cancelled:
            text = f"comparison stopped after {took:.1f} s; nothing was written"
            self.show_status(text, "yellow")
            self.post_message(LogLine(text, "warning"))
            return
        if message.error is not None:
            self.show_status(message.error, "bold red")
            self.post_message(LogLine(message.error, "error"))
            self.app.notify(message.error, severity="error", timeout=6)
            return
        result = message.result
        self.show_status(f"compared {len(result.results)} allocations in "
                         f"{result.timings['total_s']:.0f} s; saved in "
                         f"{self.folder}", "green")
        self.result = result


def saved_status(run: RunDir, backend: str, samples: int, bits: float) -> tuple[str, str, object]:
    """The status line and table of the comparison saved in the run, or what `c` would do."""
    from core.results import LABELS, load_saved
    from core.errors import UserError

    try:
        saved = load_saved(run, backend)
    except UserError as e:
        return str(e), "yellow", None
    if saved is None:
        return HINT.format(bits=_listed(compare_bits(bits)), run=run.path), "dim", None
    outdated = saved.outdated()
    if outdated:
        names = " and ".join(LABELS[m] for m in outdated)
        return (f"saved comparison ({run.path / 'compare'}); its {names} rows come from an "
                f"earlier {names}, not this version's: c compares again with the run's {samples} "
                "samples", "yellow", saved)
    return (f"saved comparison ({run.path / 'compare'}); c runs it again with the run's "
            f"{samples} samples", "dim", saved)
