"""The Compare view: IMPQ against the isolated baselines at equal memory, as
`impq-tui compare` prints it, from the run's saved compare/<backend>.json or from a
comparison started here with `c`."""
from __future__ import annotations

from rich.console import Group
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

HINT = ("Press c to evaluate IMPQ and the four isolated baselines (Sensitivity, LIM, Z-score, "
        "Activation) at the same memory with the real backend's modules: budgets {bits} bits. "
        "Same as `impq-tui compare {run}`; the table and plot are saved in the run's compare/ folder.")


class CompareView(VerticalScroll):
    """A status line over the comparison table."""

    def compose(self):
        yield Static(id="compare-status")
        yield Static(id="compare-table")

    def show_status(self, text: str, style: str = "") -> None:
        self.query_one("#compare-status", Static).update(Text(text, style=style))

    def show_result(self, result) -> None:
        from impq_tui.cli_compare import describe_eval, result_table

        lines = [result_table(result), Text(describe_eval(result), "dim")]
        lines.extend(Text(f"warning: {w}", "yellow") for w in result.warnings)
        self.query_one("#compare-table", Static).update(Group(*lines))
