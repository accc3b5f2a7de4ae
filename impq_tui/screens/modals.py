"""Small modal screens: an error, the help, a number to type, and what to do with a
run that is still going when the app quits."""
from __future__ import annotations

from rich.table import Table
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Input, Label, Static


class ErrorModal(ModalScreen[None]):
    """A readable error: what went wrong and what to do. Never a traceback."""

    BINDINGS = [Binding("escape,enter", "dismiss", "Close")]

    def __init__(self, title: str, message: str) -> None:
        super().__init__()
        self.title_text, self.message = title, message

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box", classes="modal-box"):
            yield Static(f"[b]{escape(self.title_text)}[/b]", id="error-title")
            yield Static(escape(self.message), id="error-message")
            yield Button("OK", id="error-ok", variant="error", compact=True)

    def on_mount(self) -> None:
        self.query_one("#error-ok", Button).focus()

    @on(Button.Pressed, "#error-ok")
    def _ok(self) -> None:
        self.dismiss()


HELP_INTRO = (
    "[b]impq-tui[/b] estimates how much each decoder layer's precision matters (SPQE: sampled "
    "Shapley values of the loss increase from 4-bit to 2-bit), fits the interactions between "
    "layers, and picks which layers get 4 bits under a memory budget (IMPQ, solved by SCIP); "
    "a run with more levels (run --levels 2 3 4, or the form's Levels) steps each layer down "
    "one level at a time. "
    "Keys that do not apply now (pause and stop while nothing runs, continue while a run "
    "is being written) are left out of the footer and this list.")

HELP_PANES = (
    ("progress", "sample i/M and layer step k/L of SPQE, evaluations and tokens per second, "
                 "elapsed time, ETA, device and GPU memory, and the pid of the run's process. "
                 "p pauses it between evaluations, s stops it (finished samples stay on "
                 "disk), r continues a stopped run."),
    ("budget", "average bits per weight, 2.00 to 4.00, or the run's lowest to highest level "
               "(keys or mouse); the bytes of the "
               "quantized layers and their share of the unquantized ones; Δloss, the predicted "
               "loss increase over all-4-bit in nats/token; SCIP's status and time; how many "
               "of the last samples left the allocation unchanged. Below: each layer's bits as a "
               "digit, in groups of ten (layers 0-9, 10-19, ...): 4 on green, 2 on amber."),
    ("1 Estimates", "φ per layer with ±1 standard error; max se/|φ| as samples arrive (the "
                    "largest standard error relative to its estimate, |φ| floored at a tenth "
                    "of the mean |φ|)."),
    ("2 Bits", "each layer's index, bits at this budget and φ; • marks a layer the last "
               "re-solve changed. Click a cell for its numbers."),
    ("3 Interactions", "K, the covariance of the marginal vectors shrunk to its diagonal: red "
                       "pairs cost more together than apart, blue less."),
    ("4 Frontier", "the predicted loss increase of the optimal allocation at every budget; "
                   "the current one marked."),
    ("5 Compare", "perplexity of IMPQ and the four isolated baselines at the same memory, with "
                  "the real backend (`impq-tui compare`); c runs it in the background."),
    ("6 Log", "what the engine reported."),
    ("m Model", "the allocation model every pane shows: IMPQ (the paper's, the default), or our "
                "extensions IMPQ-local (weighted toward the budget) and IMPQ-fit (fitted to the "
                "states SPQE visited, in a process of its own; it needs 2 samples)."),
    ("e Export", "evaluate perplexity and export the allocation of the chosen model with quanto, "
                 "HQQ or GPTQ."),
)

HELP_OUTRO = ("SPQE runs in a process of its own that writes the run folder, which the app "
              "follows (as it follows `impq-tui run` started elsewhere): it goes on when the "
              "terminal closes, and quitting asks whether to leave it running. "
              "`impq-tui --run DIR` opens it again.")

HOUSEKEEPING = {"app.focus_next", "app.focus_previous", "screen.copy_text"}


class HelpScreen(ModalScreen[None]):
    """F1: the keys of the screen below, then what the panes mean."""

    BINDINGS = [Binding("escape,f1,question_mark,q", "dismiss", "Close")]

    def __init__(self, under: Screen) -> None:
        super().__init__()
        self.under = under

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="modal-box"):
            yield Static("[b]Keys[/b]", classes="help-heading")
            yield Static(self._keys(), id="help-keys")
            yield Static(HELP_INTRO, classes="help-paragraph")
            yield Static(self._panes(), id="help-panes")
            yield Static(HELP_OUTRO, classes="help-paragraph")
            yield Static("[dim]escape closes this help[/dim]")

    def _keys(self) -> Table:
        rows: dict[str, list[str]] = {}
        for key, active in self.under.active_bindings.items():
            binding = active.binding
            label = binding.tooltip or binding.description
            if binding.system or not label or binding.action in HOUSEKEEPING:
                continue
            rows.setdefault(label, []).append(self.app.get_key_display(binding))
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for label, keys in rows.items():
            table.add_row(", ".join(keys), label)
        return table

    def _panes(self) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for name, text in HELP_PANES:
            table.add_row(name, text)
        return table


class NumberModal(ModalScreen[float | None]):
    """Ask for one number; dismiss with it, or None on escape."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, prompt: str, value: str, *, minimum: float, maximum: float | None = None,
                 integer: bool = False) -> None:
        super().__init__()
        self.prompt, self.value = prompt, value
        self.minimum, self.maximum, self.integer = minimum, maximum, integer

    def compose(self) -> ComposeResult:
        with Vertical(id="number-box", classes="modal-box"):
            yield Label(self.prompt)
            yield Input(self.value, id="number-input", type="integer" if self.integer else "number",
                        compact=True)
            yield Static(id="number-message")

    def on_mount(self) -> None:
        field = self.query_one(Input)
        field.cursor_blink = self.app.cursor_blink
        field.focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        try:
            number = int(event.value) if self.integer else float(event.value)
        except ValueError:
            number = None
        if number is None or number < self.minimum or (self.maximum is not None and number > self.maximum):
            bounds = f"{self.minimum} to {self.maximum}" if self.maximum is not None else f"at least {self.minimum}"
            self.query_one("#number-message", Static).update(f"[$error]give a number, {bounds}[/]")
            return
        self.dismiss(number)

    def action_cancel(self) -> None:
        self.dismiss(None)


class LeaveRunModal(ModalScreen[str | None]):
    """Quitting while SPQE runs: "leave" it running in the background, "stop" it, or
    None to stay."""

    BINDINGS = [
        Binding("l,q", "choose('leave')", "Leave it running"),
        Binding("s", "choose('stop')", "Stop it"),
        Binding("escape", "choose(None)", "Stay"),
    ]

    def __init__(self, run_dir: str, pid: int) -> None:
        super().__init__()
        self.run_dir, self.pid = run_dir, pid

    def compose(self) -> ComposeResult:
        with Vertical(id="leave-box", classes="modal-box"):
            yield Static("[b]SPQE is still running[/b]")
            yield Static(escape(
                f"pid {self.pid} writes {self.run_dir}. Left running, it goes on without the "
                f"app; `impq-tui --run {self.run_dir}` shows it again. Stopped, it ends after "
                "the evaluation in flight; finished samples are kept either way."),
                id="leave-message")
            with Horizontal(id="leave-buttons"):
                yield Button("Leave it running  l", id="leave", variant="primary", compact=True)
                yield Button("Stop it  s", id="stop", compact=True)
                yield Button("Stay  esc", id="stay", compact=True)

    def on_mount(self) -> None:
        self.query_one("#leave", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss({"leave": "leave", "stop": "stop"}.get(event.button.id))

    def action_choose(self, choice: str | None) -> None:
        self.dismiss(choice)
