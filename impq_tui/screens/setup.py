"""The setup form: what to run SPQE on, prefilled with defaults that work on a fresh
machine (the embedded model, the builtin text, the device's calibration sizes)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, Static
from textual.worker import get_current_worker

from core.errors import InvalidField, UserError, render
from core.runs import RunConfig

from impq_tui.estimate import SETTLED_SHARE, Estimate, earliest_stop

AUTO = "auto"
# A sample of the embedded model costs a minute or two on a 2-core CPU (30 evaluations of
# 1,024 tokens), so the CPU default is a run of minutes, not the GPU default's hours.
ESTIMATE_AFTER_S = 1.0     # the form waits this long after a change before probing
# The sets of precisions the form offers (README, "More than two levels"), as the Levels
# field names them; each is offered where the backend quantizes to all of its levels.
LEVEL_CHOICES = (("2 4 (paper)", (2, 4)), ("2 3 4", (2, 3, 4)), ("2 3 4 8", (2, 3, 4, 8)),
                 ("4 8", (4, 8)))
PAPER_LEVELS = "2 4"
# The narrowest screen whose Stop when settled row has room for "needs > 20 samples"
# beside the budgets; a narrower one leaves it out rather than cut it short.
SETTLE_SHORT_WIDTH = 76


def level_choices(backend: str) -> list[tuple[str, str]]:
    """(label, value) of the Levels the backend can do (core.backends.BITS_OF); the value
    is the levels written with spaces, as `run --levels` takes them."""
    from core.backends import BITS_OF

    allowed = set(BITS_OF.get(backend, (2, 4)))
    return [(label, " ".join(map(str, levels))) for label, levels in LEVEL_CHOICES
            if set(levels) <= allowed]


def parse_levels(value: str) -> tuple[int, ...]:
    return tuple(int(b) for b in value.split())


def default_budgets(levels: tuple[int, ...]) -> str:
    """The budgets "Stop when settled" watches unless others are typed: core.settle's
    defaults within the levels (their middle when none is), as the field writes them."""
    from core.settle import budgets_for

    return " ".join(f"{b:g}" for b in budgets_for(levels, None))


def parse_budgets(text: str, levels: tuple[int, ...]) -> tuple[float, ...]:
    """The budgets typed into "Stop when settled" (spaces or commas between them), each
    within the chosen levels, as `run --settle-bits` takes them."""
    import math

    words = text.replace(",", " ").split()
    if not words:
        raise InvalidField("until_settled", "has no budget: type the average bits to settle, "
                                            f"e.g. {default_budgets(levels)}, or untick it.")
    budgets = []
    for word in words:
        try:
            budgets.append(float(word))
        except ValueError:
            raise InvalidField("until_settled", f"{word!r} is not a number of bits.") from None
    lo, hi = min(levels), max(levels)
    outside = [b for b in budgets if not (math.isfinite(b) and lo <= b <= hi)]
    if outside:
        raise InvalidField("until_settled", f"{', '.join(f'{b:g}' for b in outside)} "
                                            f"{'is' if len(outside) == 1 else 'are'} outside the "
                                            f"chosen `levels` ({lo} to {hi} bits): choose "
                                            "budgets between them.")
    return tuple(sorted(set(budgets)))


@dataclass(frozen=True)
class SetupDefaults:
    """What the form starts with; tests and scripts pass their own."""
    model: str = "embedded"
    calib_text: str = "builtin"
    backend: str = RunConfig.backend
    samples: int | None = None        # None: the device's default (default_samples)
    seed: int = RunConfig.seed
    device: str = AUTO
    windows: int | None = None        # None: the device's default
    window_tokens: int | None = None
    group_size: int = RunConfig.group_size
    gguf_types: str = "Q2_K,Q4_K"     # the gguf backend's low and high llama.cpp types
    levels: str = PAPER_LEVELS        # one of LEVEL_CHOICES' values: "2 3 4"
    antithetic: bool = False
    until_settled: bool = True        # stop once the allocations are settled (core.settle)
    settle_bits: str | None = None    # None: default_budgets of the levels
    run_dir: str = ""


def device_choices() -> list[tuple[str, str]]:
    import torch

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    choices = [(f"auto ({auto})", AUTO), ("cpu", "cpu")]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        choices.append((f"cuda:{i} {torch.cuda.get_device_name(i)}", f"cuda:{i}"))
    return choices


def defaults_for(device: str, backend: str | None = None) -> dict:
    from core.settings import device_defaults
    from core.models import pick_device

    return device_defaults(pick_device(None if device == AUTO else device), backend)


def default_samples(device: str) -> int:
    """The device's default (core.settings): fewer on a CPU, where a sample takes long."""
    return defaults_for(device)["samples"]


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
    "window_tokens": "Tokens per window", "group_size": "Group size", "gguf_types": "GGUF types",
    "antithetic": "Antithetic pairs", "run_dir": "Run folder", "resume": "Run folder",
    "levels": "Levels", "until_settled": "Stop when settled",
    "micro_batch": "micro-batch", "gpus": "GPUs",
}


class EstimateReady(Message):
    """The form's duration estimate for `key` (the inputs it was made for)."""

    def __init__(self, key: tuple, estimate: Estimate | None, why: str = "") -> None:
        super().__init__()
        self.key, self.estimate, self.why = key, estimate, why


class SetupScreen(Screen):
    """F5 starts a new run; F6 opens the run folder given instead, or the list of runs.
    Under the fields, how long the run will take and how that was found out."""

    BINDINGS = [
        Binding("f5", "start", "Start run"),
        Binding("f6", "open", "Open run"),
        Binding("escape", "runs", "Runs", show=False),
    ]

    # Probes already made, by what they measured: the form asks again only for news.
    measured: dict[tuple, tuple[Estimate | None, str]] = {}

    def __init__(self, defaults: SetupDefaults | None = None) -> None:
        super().__init__()
        self.defaults = defaults or SetupDefaults()
        self.estimate: Estimate | None = None
        self.estimate_for: tuple | None = None     # the inputs self.estimate was made for
        self._auto_samples: int | None = None      # the samples default the form filled in
        self._auto_budgets: str | None = None      # likewise the budgets to settle
        self._auto_sizes: tuple[str, str] | None = None   # and Windows × tokens
        self._estimate_timer = None

    def compose(self) -> ComposeResult:
        d = self.defaults
        sizes = defaults_for(d.device, d.backend)
        self._auto_samples = default_samples(d.device)
        self._auto_sizes = (str(sizes["windows"]), str(sizes["window_tokens"]))
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
                yield Select([("quanto", "quanto"), ("hqq", "hqq"), ("gguf (llama.cpp)", "gguf"),
                              ("gptq (GPTQModel)", "gptq")],
                             value=d.backend, allow_blank=False, id="backend", compact=True)
                yield Label("Levels (bits)")
                choices = level_choices(d.backend)
                yield Select(choices, allow_blank=False, id="levels", compact=True,
                             value=d.levels if d.levels in dict(map(reversed, choices))
                             else PAPER_LEVELS)
                # Shown only for the gguf backend: its pair of llama.cpp types.
                gguf_label = Label("GGUF types", id="gguf_types_label")
                gguf_types = Input(d.gguf_types, id="gguf_types", compact=True,
                                   placeholder="low,high: Q2_K,Q4_K (K-quants, Q8_0, IQ types)")
                gguf_label.display = gguf_types.display = d.backend == "gguf"
                yield gguf_label
                yield gguf_types
                yield Label("Samples M")
                yield Input(str(d.samples or self._auto_samples), id="samples", compact=True)
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
                yield Label("Stop when settled")
                with Horizontal(id="setup-settle"):
                    yield Checkbox("at budgets", d.until_settled, id="until_settled",
                                   compact=True)
                    levels = parse_levels(d.levels if d.levels in dict(map(reversed, choices))
                                          else PAPER_LEVELS)
                    self._auto_budgets = default_budgets(levels)
                    budgets = Input(d.settle_bits or self._auto_budgets, id="settle_bits",
                                    compact=True, placeholder="bits, e.g. 2.5 3 3.5")
                    budgets.disabled = not d.until_settled
                    yield budgets
                    # said where the run is too short for the rule (impq_tui.estimate.earliest_stop)
                    yield Static(f"[dim]needs > {earliest_stop()} samples[/dim]", id="settle-short")
                yield Label("Run folder")
                yield Input(d.run_dir, id="run_dir", compact=True,
                            placeholder="runs/<model>-<time>; F6 opens an existing run")
            with Horizontal(id="setup-estimate-row"):
                yield Label("Duration", id="setup-estimate-label")
                yield Static(id="setup-estimate")
            with Horizontal(id="setup-buttons"):
                yield Button("Start  F5", id="start", variant="primary", compact=True)
                yield Button("Open run  F6", id="open", compact=True)
        # outside the scrolled form, above the footer: in view on any terminal, whatever
        # the form's rows do after it is shown (an estimate coming in, fields shown)
        message = Static(id="setup-message")
        message.display = False
        yield message
        yield Footer()

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = self.app.cursor_blink
        self.query_one("#model", Input).focus()
        self._estimate_soon()

    @on(Select.Changed, "#device")
    def _device_changed(self, event: Select.Changed) -> None:
        try:
            sizes = defaults_for(str(event.value), str(self.query_one("#backend", Select).value))
            samples = default_samples(str(event.value))
        except UserError as exc:
            self.show_error(exc)
            return
        self._follow_sizes(sizes)
        if self.value("samples") == str(self._auto_samples):    # not one the user typed
            self.query_one("#samples", Input).value = str(samples)
        self._auto_samples = samples
        self._estimate_soon()

    def _follow_sizes(self, sizes: dict) -> None:
        """Windows × tokens follow the device's and backend's defaults while they are the
        defaults the form filled in (Select.Changed comes on mount too: sizes given as
        defaults, or typed, are kept)."""
        if (self.value("windows"), self.value("window_tokens")) == self._auto_sizes:
            self.query_one("#windows", Input).value = str(sizes["windows"])
            self.query_one("#window_tokens", Input).value = str(sizes["window_tokens"])
        self._auto_sizes = (str(sizes["windows"]), str(sizes["window_tokens"]))

    @on(Select.Changed, "#backend")
    def _backend_changed(self, event: Select.Changed) -> None:
        self._show_gguf_types(str(event.value) == "gguf")
        try:
            self._follow_sizes(defaults_for(str(self.query_one("#device", Select).value), str(event.value)))
        except UserError as exc:
            self.show_error(exc)
        levels = self.query_one("#levels", Select)
        choices = level_choices(str(event.value))
        kept = levels.value if levels.value in {v for _, v in choices} else PAPER_LEVELS
        levels.set_options(choices)
        levels.value = kept

    @on(Select.Changed, "#levels")
    def _levels_changed(self) -> None:
        budgets, auto = self.query_one("#settle_bits", Input), default_budgets(self.levels())
        if budgets.value.strip() == self._auto_budgets:     # not ones the user typed
            budgets.value = auto
        self._auto_budgets = auto
        self._show_estimate()

    @on(Checkbox.Changed, "#until_settled")
    def _until_settled_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#settle_bits", Input).disabled = not event.value
        self._show_estimate()

    def levels(self) -> tuple[int, ...]:
        """The precisions chosen in Levels."""
        return parse_levels(str(self.query_one("#levels", Select).value))

    def _show_gguf_types(self, shown: bool) -> None:
        for widget in (self.query_one("#gguf_types_label"), self.query_one("#gguf_types")):
            widget.display = shown

    @on(Input.Changed, "#model, #windows, #window_tokens")
    def _shape_changed(self) -> None:
        self._estimate_soon()

    @on(Input.Changed, "#samples")
    def _samples_changed(self) -> None:
        self._show_estimate()

    def _show_settle_short(self) -> None:
        """Beside Stop when settled: whether Samples M leaves it room to stop early."""
        try:
            samples = int(self.value("samples"))
        except ValueError:
            samples = None
        self.query_one("#settle-short").display = (
            self.query_one("#until_settled", Checkbox).value and samples is not None
            and 0 < samples <= earliest_stop() and self.size.width >= SETTLE_SHORT_WIDTH)

    def on_resize(self) -> None:
        self._show_settle_short()

    # ------------------------------------------------------------------ the estimate
    def estimate_key(self) -> tuple | None:
        """What an estimate depends on: (model, device, dtype, windows, window_tokens,
        micro_batch); None while the sizes are not whole numbers."""
        from core.models import pick_device

        choice = str(self.query_one("#device", Select).value)
        try:
            windows, tokens = int(self.value("windows")), int(self.value("window_tokens"))
            device = str(pick_device(None if choice == AUTO else choice))
            sizes = defaults_for(choice)
        except (ValueError, UserError):
            return None
        if windows < 1 or tokens < 2:
            return None
        return (self.value("model") or "embedded", device, sizes["dtype"], windows, tokens,
                sizes["micro_batch"])

    def _estimate_soon(self) -> None:
        """Estimate once the fields have been left alone for a moment (typing a model name
        should not start a probe per letter, nor should a form that F5 leaves at once)."""
        if self._estimate_timer is not None:
            self._estimate_timer.stop()
        key = self.estimate_key()
        if key is not None and key in self.measured:
            self._estimated(key, *self.measured[key])
            return
        self.estimate = None
        self.estimate_for = None
        self._show_estimate(pending=key is not None)
        if key is not None:
            self._estimate_timer = self.set_timer(ESTIMATE_AFTER_S, lambda: self.app.run_worker(
                lambda: self._measure(key), name="estimate", group="estimate", thread=True,
                exclusive=True, exit_on_error=False))

    def _measure(self, key: tuple) -> None:
        """In a worker: the rate a run of the same model on this device measured, else a
        probe of the model's shape (a few seconds on a CPU)."""
        from impq_tui.estimate import from_history, from_probe, model_shape, probe

        model, device, dtype, windows, tokens, micro_batch = key
        worker = get_current_worker()
        if not self.is_current:
            return
        known = getattr(self.app, "known_runs", None) or ()
        estimate = from_history(known, model, device, dtype, windows, tokens)
        why = ""
        if estimate is None or not estimate.layers:
            shape = model_shape(model)
            if shape is None:
                why = ("no estimate: this model's config is not on this machine (a GGUF, or a hub "
                       "id not downloaded yet); the dashboard shows the rate once SPQE runs")
            elif estimate is not None:
                estimate = Estimate(estimate.sample_s, shape.layers, estimate.how)
            else:
                try:
                    layer_s, head_s = probe(shape, device, dtype, windows, tokens, micro_batch)
                except (MemoryError, RuntimeError) as exc:
                    why = f"no estimate: the probe failed ({str(exc).splitlines()[0][:120]})"
                else:
                    estimate = from_probe(shape.layers, layer_s, head_s, device, windows, tokens)
        if not worker.is_cancelled:
            self.post_message(EstimateReady(key, estimate, why))

    def on_estimate_ready(self, message: EstimateReady) -> None:
        self.measured[message.key] = (message.estimate, message.why)
        self._estimated(message.key, message.estimate, message.why)

    def _estimated(self, key: tuple, estimate: Estimate | None, why: str) -> None:
        if key != self.estimate_key():
            return          # the fields changed meanwhile; their own estimate is on its way
        self.estimate, self.estimate_for = estimate, key
        self._show_estimate(why=why)

    def _show_estimate(self, pending: bool = False, why: str = "") -> None:
        self._show_settle_short()
        field = self.query_one("#setup-estimate", Static)
        estimate = self.estimate
        if estimate is None:
            # why there is none, or that one is on its way (whichever field changed meanwhile)
            key = self.estimate_key()
            why = why or self.measured.get(key, (None, ""))[1]
            text = why or ("estimating…" if pending or key is not None else
                           "no estimate until Windows × tokens are whole numbers")
            field.update(f"[dim]{_escape(text)}[/dim]")
            return
        try:
            samples = int(self.value("samples"))
        except ValueError:
            samples = 0
        if samples < 1:
            field.update("[dim]no estimate until Samples M is a whole number[/dim]")
            return
        steps = len(self.levels()) - 1
        note = ""
        if self.estimate_for[1] == "cpu":
            import torch

            from core.settings import device_defaults

            gpu = device_defaults(torch.device("cuda"))["samples"]
            note = f"\n[dim]CPU default: {default_samples('cpu')} samples ({gpu} on a GPU)[/dim]"
        each = about(estimate.sample_for(steps))
        per_sample = (f"{estimate.layers} evaluations ({each} a sample)" if steps == 1 else
                      f"{estimate.layers} × {steps} evaluations ({steps} steps a layer, {each} "
                      "a sample)")
        # Stop when settled: the full run is a maximum, said with what runs measured took
        # (impq_tui.estimate.SETTLED_SHARE); one too short to stop early says so beside it.
        bound, settle = "≈", ""
        if self.query_one("#until_settled", Checkbox).value and samples > earliest_stop():
            bound = "≤"
            settle = (f"\n[dim]a maximum: Stop when settled ends runs sooner ({SETTLED_SHARE:.0%} "
                      "of the samples on average, measured on the embedded model)[/dim]")
        field.update(
            f"[b]{bound} {about(estimate.run_s(samples, steps))}[/b] for {samples} × {per_sample}, "
            f"plus loading and quantizing{settle}\n[dim]{_escape(estimate.how)}[/dim]{note}")

    # ------------------------------------------------------------------ buttons and keys
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
        message = self.query_one("#setup-message", Static)
        message.update(f"[$error]{_escape(text)}[/]")
        message.display = bool(text)

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
            gguf_types=(self.value("gguf_types") or None
                        if str(self.query_one("#backend", Select).value) == "gguf" else None),
            group_size=self.integer("group_size"), samples=self.integer("samples"),
            windows=self.integer("windows"), window_tokens=self.integer("window_tokens"),
            seed=self.integer("seed"), antithetic=self.query_one("#antithetic", Checkbox).value,
            levels=None if self.levels() == (2, 4) else self.levels(),
            until_settled=self.until_settled())
        request.validate()
        return RunConfig(**request.config_values(), device=str(device), dtype=sizes["dtype"],
                         micro_batch=sizes["micro_batch"])

    def until_settled(self) -> tuple[float, ...]:
        """The budgets "Stop when settled" watches; () when it is off (all samples run)."""
        if not self.query_one("#until_settled", Checkbox).value:
            return ()
        return parse_budgets(self.value("settle_bits"), self.levels())

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
        """The run typed into Run folder; with none typed, the list of runs."""
        path = self.value("run_dir")
        if not path:
            self.action_runs()
            return
        try:
            self.app.open_run(path)
        except UserError as exc:
            self.show_error(exc)

    def action_runs(self) -> None:
        self.app.show_runs()


def about(seconds: float) -> str:
    """A duration as an estimate reads: "40 s", "21 min", "2 h 10 min", "3 d 4 h"."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _escape(text: str) -> str:
    from textual.markup import escape

    return escape(text)
