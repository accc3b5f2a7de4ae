"""The Compare view: IMPQ against the isolated baselines at equal memory, as
`impq-tui compare` prints it, from the run's saved compare/<backend>.json or from a
comparison started here with `c` (in a thread worker of its own)."""
from __future__ import annotations

import threading

from rich.console import Group
from rich.text import Text
from textual.containers import VerticalScroll
from textual.reactive import reactive
from textual.widgets import Static

from core import events
from core.runs import RunDir

from impq_tui.messages import CompareDone, LogLine
from impq_tui.report import compare_table, describe_eval

HINT = ("Press c to evaluate IMPQ and the four isolated baselines (Sensitivity, LIM, Z-score, "
        "Activation) at the same memory with the real backend's modules: budgets {bits} bits. "
        "Same as `impq-tui compare {run}`; the table and plot are saved in the run's compare/ folder.")


def compare_bits(bits: float) -> list[float]:
    """The preset budgets and the one on screen (the all-2 and all-4 ends are not compared)."""
    from core.compare import DEFAULT_BITS

    return sorted({*DEFAULT_BITS, round(bits, 2)} - {2.0, 4.0})


def _listed(bits: list[float]) -> str:
    return ", ".join(f"{b:g}" for b in bits)


class CompareView(VerticalScroll):
    """A status line over the comparison table."""

    result = reactive(None, always_update=True)       # the CompareResult shown
    running: reactive[bool] = reactive(False, bindings=True)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cancel = threading.Event()
        self.folder = None      # where the comparison running now is saved

    def compose(self):
        yield Static(id="compare-status")
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

    def show_saved(self, run: RunDir, backend: str, samples: int, bits: float) -> None:
        """The comparison saved in the run, or what `c` would do."""
        from core.compare import load_saved
        from core.errors import UserError

        try:
            saved = load_saved(run, backend)
        except UserError as e:
            self.show_status(str(e), "yellow")
            return
        if saved is None:
            self.show_status(HINT.format(bits=_listed(compare_bits(bits)), run=run.path), "dim")
            return
        self.show_status(f"saved comparison ({run.path / 'compare'}); c runs it again with the "
                         f"run's {samples} samples", "dim")
        self.result = saved

    def start(self, run: RunDir, bits: float, samples: int) -> None:
        """Evaluate IMPQ and the baselines at the preset budgets and `bits`, in a thread."""
        from core.compare import compare

        budgets = compare_bits(bits)
        self.cancel.clear()
        self.running = True
        self.show_status(f"comparing at {_listed(budgets)} bits with {samples} samples "
                         "(progress in the log, 6)…", "bold")
        cancel = self.cancel
        self.folder = run.path / "compare"

        def work() -> None:
            from core.errors import UserError
            from core.spqe import Cancelled

            def callback(event: events.Event) -> None:
                if isinstance(event, events.Log) and not cancel.is_set():
                    self.post_message(LogLine(f"compare: {event.message}", event.level))

            try:
                result, error = compare(run, budgets, callback=callback, cancel=cancel), None
            except Cancelled:
                result, error = None, "comparison stopped; nothing was written"
            except UserError as e:
                result, error = None, str(e)
            except Exception as e:   # out of memory and the like: a message, not a traceback
                result, error = None, f"comparison failed: {type(e).__name__}: {e}"
            self.post_message(CompareDone(result, error))

        self.run_worker(work, name="compare", group="compare", exclusive=True, thread=True,
                        exit_on_error=False)

    def on_compare_done(self, message: CompareDone) -> None:
        self.running = False
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

