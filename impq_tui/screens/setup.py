"""The setup form: what to run SPQE on, prefilled with defaults that work on a fresh
machine (the embedded model, the builtin text, the device's calibration sizes)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, Static

from core.errors import InvalidField, UserError, render
from core.runs import RunConfig

AUTO = "auto"


@dataclass(frozen=True)
class SetupDefaults:
    """What the form starts with; tests and scripts pass their own."""
    model: str = "embedded"
    calib_text: str = "builtin"
    backend: str = RunConfig.backend
    samples: int = RunConfig.samples
    seed: int = RunConfig.seed
    device: str = AUTO
    windows: int | None = None        # None: the device's default
    window_tokens: int | None = None
    group_size: int = RunConfig.group_size
    antithetic: bool = False
    run_dir: str = ""


def device_choices() -> list[tuple[str, str]]:
    import torch

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    choices = [(f"auto ({auto})", AUTO), ("cpu", "cpu")]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        choices.append((f"cuda:{i} {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    return choices


def defaults_for(device: str) -> dict:
    from core.settings import device_defaults
    from core.models import pick_device

    return device_defaults(pick_device(None if device == AUTO else device))


def run_name(model: str) -> str:
    """The short model name a default run folder is called after (as `impq-tui run`)."""
    from core.models import EMBEDDED, EMBEDDED_NAME

    if model == EMBEDDED:
        return EMBEDDED_NAME
    return Path(model.rstrip("/")).name.removesuffix(".gguf").replace("/", "--") or "model"


# Each field of core.requests.RunRequest as this form labels it (core names fields; the
# CLI shows them as flags, the form as these labels).
FIELD_LABELS = {
    "model": "Model", "calib_text": "Calibration text", "backend": "Backend",
    "samples": "Samples M", "seed": "Seed", "device": "Device", "windows": "Windows",
    "window_tokens": "Tokens per window", "group_size": "Group size",
    "antithetic": "Antithetic pairs", "run_dir": "Run folder", "resume": "Run folder",
    "micro_batch": "micro-batch", "gpus": "GPUs",
}


class SetupScreen(Screen):
    """F5 starts a new run; F6 opens the run folder given instead."""

    BINDINGS = [
        Binding("f5", "start", "Start run"),
        Binding("f6", "open", "Open run"),
    ]

    def __init__(self, defaults: SetupDefaults | None = None) -> None:
        super().__init__()
        self.defaults = defaults or SetupDefaults()

    def compose(self) -> ComposeResult:
        d = self.defaults
        sizes = defaults_for(d.device)
        with VerticalScroll(id="setup"):
            yield Static("[b]New SPQE run[/b]  [dim]estimate each layer's Shapley value, then pick "
                         "a budget[/dim]", id="setup-title")
            with Grid(id="setup-form"):
                yield Label("Model")
                yield Input(d.model, id="model", compact=True,
                            placeholder="embedded, a hub id, a checkpoint folder or a .gguf")
                yield Label("Calibration text")
                yield Input(d.calib_text, id="calib_text", compact=True,
                            placeholder="builtin, wikitext2, c4 or a .txt/.jsonl/.parquet path")
                yield Label("Backend")
                yield Select([("quanto", "quanto"), ("hqq", "hqq")], value=d.backend,
                             allow_blank=False, id="backend", compact=True)
                yield Label("Samples M")
                yield Input(str(d.samples), id="samples", compact=True)
                yield Label("Seed")
                yield Input(str(d.seed), id="seed", compact=True)
                yield Label("Device")
                yield Select(device_choices(), value=d.device, allow_blank=False, id="device",
                             compact=True)
                yield Label("Windows × tokens")
                with Horizontal(id="setup-sizes"):
                    yield Input(str(d.windows or sizes["windows"]), id="windows",
                                compact=True)
                    yield Label("×")
                    yield Input(str(d.window_tokens or sizes["window_tokens"]), id="window_tokens",
                                compact=True)
                yield Label("Group size")
                yield Input(str(d.group_size), id="group_size", compact=True)
                yield Label("Antithetic pairs")
                yield Checkbox("pair each permutation with its reverse", d.antithetic,
                               id="antithetic", compact=True)
                yield Label("Run folder")
                yield Input(d.run_dir, id="run_dir", compact=True,
                            placeholder="runs/<model>-<time>; F6 opens an existing run")
            with Horizontal(id="setup-buttons"):
                yield Button("Start  F5", id="start", variant="primary", compact=True)
                yield Button("Open run  F6", id="open", compact=True)
            yield Static(id="setup-message")
        yield Footer()

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = self.app.cursor_blink
        self.query_one("#model", Input).focus()

    @on(Select.Changed, "#device")
    def _device_changed(self, event: Select.Changed) -> None:
        try:
            sizes = defaults_for(str(event.value))
        except UserError as exc:
            self.show_error(exc)
            return
        self.query_one("#windows", Input).value = str(sizes["windows"])
        self.query_one("#window_tokens", Input).value = str(sizes["window_tokens"])

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#open")
    def _open_pressed(self) -> None:
        self.action_open()

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_start()

    def show_message(self, text: str) -> None:
        self.query_one("#setup-message", Static).update(f"[$error]{_escape(text)}[/]")

    def value(self, field: str) -> str:
        return self.query_one(f"#{field}", Input).value.strip()

    def integer(self, field: str) -> int:
        """A whole number typed into `field`; letters, exponents and blanks are refused
        with a message, never silently dropped ("1e99" is not 199)."""
        text = self.value(field)
        try:
            return int(text)
        except ValueError:
            raise InvalidField(field, f"{text!r} is not a whole number.") from None

    def config(self) -> RunConfig:
        """The RunConfig the form describes, checked by core.requests.RunRequest as
        `impq-tui run` checks its flags."""
        from core.models import pick_device
        from core.requests import RunRequest

        device_choice = str(self.query_one("#device", Select).value)
        device = pick_device(None if device_choice == AUTO else device_choice)
        sizes = defaults_for(device_choice)
        if not self.value("calib_text"):
            raise InvalidField("calib_text", "is empty: use builtin, wikitext2, c4 or a file path.")
        request = RunRequest(
            model=self.value("model") or "embedded", calib_text=self.value("calib_text"),
            backend=str(self.query_one("#backend", Select).value),
            group_size=self.integer("group_size"), samples=self.integer("samples"),
            windows=self.integer("windows"), window_tokens=self.integer("window_tokens"),
            seed=self.integer("seed"), antithetic=self.query_one("#antithetic", Checkbox).value)
        request.validate()
        return RunConfig(**request.config_values(), device=str(device), dtype=sizes["dtype"],
                         micro_batch=sizes["micro_batch"])

    def show_error(self, exc: UserError) -> None:
        """A user error in the form's words: each field by its label, never a flag."""
        text = exc.named(FIELD_LABELS.get(exc.field, exc.field)) if isinstance(exc, InvalidField) else str(exc)
        self.show_message(render(text, FIELD_LABELS))

    def action_start(self) -> None:
        from core.runs import default_run_dir

        try:
            config = self.config()
            path = self.value("run_dir") or str(default_run_dir(run_name(config.model)))
            self.app.start_run(config, path)
        except UserError as exc:
            self.show_error(exc)

    def action_open(self) -> None:
        path = self.value("run_dir")
        if not path:
            self.show_message("Type the folder of a saved run into Run folder, then press F6.")
            return
        try:
            self.app.open_run(path)
        except UserError as exc:
            self.show_error(exc)


def _escape(text: str) -> str:
    from textual.markup import escape

    return escape(text)
