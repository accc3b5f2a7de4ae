"""Export the allocation at the chosen budget, by the allocation model chosen on the
dashboard (IMPQ, or our IMPQ-local or IMPQ-fit, as `export --local/--fit`), or by IMPQ-fit,
checked (our extension, `export --checked`: its candidates measured with the model loaded,
core.compare.checked_allocation, once per screen and sample count): pick a backend and a
folder, optionally measure perplexity first (core.evaluate), then write a model ordinary
tools load (core.export, shared with the headless CLI). With the gguf backend the screen
shows the llama.cpp type each level is written as."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.markup import escape
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    Footer,
    Input,
    Label,
    RichLog,
    Select,
    Static,
)
from textual.worker import get_current_worker

from core import events
from core.evaluate import result_stem
from core.export import EXPORT_BACKENDS, ExportResult, check_target, export_model
from core.results import IMPQ, IMPQ_CHECKED
from core.runs import RunDir
from core.solver import Allocation
from core.spqe import Cancelled

from impq_tui.analysis import model_label
from impq_tui.messages import JobStep, LogLine
from impq_tui.report import fmt_bytes, level_counts
from impq_tui.widgets.panes import JobProgress


class TaskDone(Message):
    def __init__(self, kind: str, text: str) -> None:
        super().__init__()
        self.kind, self.text = kind, text


class Measured(Message):
    """IMPQ-fit, checked's allocation, measured on the worker for `samples` samples."""

    def __init__(self, checked, samples: int) -> None:
        super().__init__()
        self.checked, self.samples = checked, samples


CHECKED_HINT = ("about 30 allocations measured on the calibration text when you export or "
                "evaluate (it loads the model), the least loss kept")


class ExportScreen(Screen):
    BINDINGS = [
        Binding("f5", "export", "Export"),
        Binding("f6", "evaluate", "Evaluate"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, run: RunDir, allocation: Allocation, bits: float,
                 method: str = IMPQ) -> None:
        """method: the allocation model `allocation` is of (core.results.RUN_METHODS)."""
        super().__init__()
        self.run, self.allocation, self.bits, self.method = run, allocation, bits, method
        self.busy = False
        self.cancel = threading.Event()      # export_model stops between its steps
        self.checked = None                  # IMPQ-fit, checked's core.checked.Checked, once measured
        self.checked_samples = 0             # of how many samples

    @property
    def chosen(self) -> tuple[str, Allocation | None]:
        """The model and allocation the next job writes: the dashboard's, or IMPQ-fit,
        checked's where its box is ticked (None until measured)."""
        if self.is_mounted and self.query_one("#export-checked", Checkbox).value:
            return IMPQ_CHECKED, self.checked.allocation if self.checked is not None else None
        return self.method, self.allocation

    def _title(self) -> str:
        method, a = self.chosen
        head = f"[b]Export[/b] the [b]{escape(model_label(method))}[/b] allocation at [b]{self.bits:.2f}[/b] bits"
        if a is None:
            return f"{head}: {CHECKED_HINT}"
        counts = level_counts(a.bits_per_layer, self.run.config.levels)
        return (f"{head}: {counts}, {fmt_bytes(a.bytes)} ({a.avg_bits:.3f} bits/weight "
                "with metadata)")

    def compose(self) -> ComposeResult:
        backend = (self.run.config.backend if self.run.config.backend in EXPORT_BACKENDS
                   else EXPORT_BACKENDS[0])
        with Vertical(id="export"):
            yield Static(self._title(), id="export-title")
            with Grid(id="export-form"):
                yield Label("Allocation")
                yield Checkbox("IMPQ-fit, checked (our extension), measured first", False,
                               id="export-checked", compact=True)
                yield Label("Backend")
                yield Select([(b, b) for b in EXPORT_BACKENDS], value=backend, allow_blank=False,
                             id="export-backend", compact=True)
                yield Label("GGUF types", id="export-gguf-label")
                yield Static(escape(self._gguf_types()), id="export-gguf-types")
                yield Label("Output folder")
                yield Input(self._default_out(backend), id="export-out", compact=True)
                yield Label("Perplexity")
                yield Checkbox("measure the quantized model", False, id="export-eval", compact=True)
                yield Label("Verify")
                yield Checkbox("load the export back in a fresh process (README snippet)", False,
                               id="export-verify", compact=True)
                yield Label("Evaluation text")
                yield Input("builtin", id="export-eval-text", compact=True)
                yield Label("Existing folder")
                yield Checkbox("overwrite it", False, id="export-force", compact=True)
            with Horizontal(id="export-buttons"):
                yield Button("Export  F5", id="export-go", variant="primary", compact=True)
                yield Button("Evaluate  F6", id="export-evaluate", compact=True)
                yield Button("Back  esc", id="export-back", compact=True)
            yield JobProgress(id="export-progress")
            yield Static(id="export-result")
            yield RichLog(id="export-log", markup=False, wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = self.app.cursor_blink
        self._show_gguf_types(str(self.query_one("#export-backend", Select).value))

    def _gguf_types(self) -> str:
        """The llama.cpp type of each level, as the gguf export takes them (core.backends
        backend_for, as `impq-tui export --backend gguf`): a gguf run's own types, the ones
        its byte costs were measured for; for any other run the gguf defaults (its bytes
        were measured for its own backend's format, not for these)."""
        from core.backends.gguf import parse_types

        config = self.run.config
        levels = tuple(config.levels)
        types = " / ".join(parse_types(config.gguf_types or None, levels))
        if config.backend == "gguf":
            return f"{types} (the run's, as measured)"
        return f"{types} (the defaults; the run measured {config.backend} sizes)"

    def _show_gguf_types(self, backend: str) -> None:
        for row in self.query("#export-gguf-label, #export-gguf-types"):
            row.display = backend == "gguf"

    def on_unmount(self) -> None:
        self.cancel.set()      # quitting stops a job in flight (and kills a verify process)

    def _default_out(self, backend: str) -> str:
        # IMPQ's folder as before; our models' get the suffix of their files (-local, -fit, -checked)
        model = result_stem(self.bits, method=self.chosen[0]).removeprefix(result_stem(self.bits))
        return str(self.run.path / "exports" / f"{backend}-{self.bits:.2f}{model}")

    def _follow_default_out(self) -> None:
        """The output folder follows the backend and model while it is the default one."""
        out = self.query_one("#export-out", Input)
        if Path(out.value).parent == self.run.path / "exports":
            out.value = self._default_out(str(self.query_one("#export-backend", Select).value))

    @on(Select.Changed, "#export-backend")
    def _backend_changed(self, event: Select.Changed) -> None:
        self._show_gguf_types(str(event.value))
        self._follow_default_out()

    @on(Checkbox.Changed, "#export-checked")
    def _checked_changed(self, event: Checkbox.Changed) -> None:
        self.query_one("#export-title", Static).update(self._title())
        self._follow_default_out()

    def on_measured(self, message: Measured) -> None:
        self.checked, self.checked_samples = message.checked, message.samples
        self.query_one("#export-title", Static).update(self._title())

    @on(Button.Pressed, "#export-go")
    def _go(self) -> None:
        self.action_export()

    @on(Button.Pressed, "#export-evaluate")
    def _evaluate_pressed(self) -> None:
        self.action_evaluate()

    @on(Button.Pressed, "#export-back")
    def _back_pressed(self) -> None:
        self.action_back()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("export", "evaluate"):
            return None if self.busy else True
        return True

    def action_back(self) -> None:
        """Esc: stop the job running (within a second: between layers, micro-batches and
        phases, the verify process killed), or go back when none runs."""
        if self.busy:
            if not self.cancel.is_set():
                self.cancel.set()
                self.query_one(JobProgress).stopping()
            return
        self.dismiss()

    def action_evaluate(self) -> None:
        self._start(export=False)

    def action_export(self) -> None:
        self._start(export=True)

    def _start(self, export: bool) -> None:
        if self.busy:
            return
        out = self.query_one("#export-out", Input).value.strip()
        if export and not out:
            self._result("error", "Give an output folder.")
            return
        options = {
            "export": export,
            "checked": self.query_one("#export-checked", Checkbox).value,
            "evaluate": self.query_one("#export-eval", Checkbox).value,
            "verify": self.query_one("#export-verify", Checkbox).value,
            "backend": str(self.query_one("#export-backend", Select).value),
            "out": out,
            "force": self.query_one("#export-force", Checkbox).value,
            "eval_text": self.query_one("#export-eval-text", Input).value.strip() or "builtin",
        }
        self.busy = True
        self.cancel.clear()
        self.refresh_bindings()
        self._result("busy", "evaluating…" if not export else "exporting…")
        self.query_one(JobProgress).start("starting")
        self.query_one("#export-back", Button).label = "Stop  esc"
        self.app.run_worker(lambda: self._work(**options), name="export", group="export",
                            exclusive=True, thread=True, exit_on_error=False)

    def _work(self, *, export: bool, checked: bool, evaluate: bool, verify: bool, backend: str,
              out: str, force: bool, eval_text: str) -> None:
        """On a worker thread: post messages only."""
        worker = get_current_worker()

        def callback(event: events.Event) -> None:
            if isinstance(event, events.Step):
                self.post_message(JobStep(event))
            elif isinstance(event, events.Log):
                self.post_message(LogLine(event.message, event.level))

        method, allocation = self.method, self.allocation
        folder = self.run.path / "exports"      # the default output folder's parent: the run's own
        made = export and Path(out).parent == folder and not folder.exists()
        try:
            if made:
                try:
                    folder.mkdir()
                except OSError:
                    made = False         # export_model says why it cannot write there
            if export and checked:       # a folder it cannot write is said before measuring
                check_target(Path(out), self.run.path, force)
            if checked:
                method, allocation = IMPQ_CHECKED, self._measure_checked(callback)
            bits = list(allocation.bits_per_layer)
            if not export:
                self._evaluate(bits, allocation, method, backend, eval_text, callback)
                return
            if not worker.is_cancelled:
                exported = export_model(self.run, bits, backend, out, force=force,
                                        target_bits=self.bits, method=method,
                                        evaluate=evaluate, verify=verify, eval_text=eval_text,
                                        callback=callback, cancel=self.cancel)
                self.post_message(TaskDone("export", describe(exported, method)))
        except Cancelled:
            self.post_message(TaskDone("cancelled", "export" if export else "evaluation"))
        finally:
            if made and not any(folder.iterdir()):
                try:
                    folder.rmdir()       # made for an export that was not written
                except OSError:
                    pass
            self.post_message(TaskDone("end", ""))

    def _measure_checked(self, callback) -> Allocation:
        """IMPQ-fit, checked's allocation (on the worker): the one measured on this screen
        where the run has no samples more since, else measured now (core.compare), saying
        what it measured in the log."""
        from core.compare import checked_allocation

        samples = len(self.run.D())
        if self.checked is not None and self.checked_samples == samples:
            return self.checked.allocation
        checked = checked_allocation(self.run, bits=self.bits, callback=callback, cancel=self.cancel)
        self.post_message(Measured(checked, samples))
        return checked.allocation

    def _evaluate(self, bits: list[int], allocation: Allocation, method: str, backend: str,
                  eval_text: str, callback) -> None:
        """Perplexity with the real backend's modules, simulated, and unquantized; saved in
        the run's evals/ as `impq-tui eval` saves it."""
        from core.evaluate import evaluate_allocation

        result = evaluate_allocation(self.run, bits, eval_text=eval_text, backend=backend,
                                     callback=callback, cancel=self.cancel)
        record = {**result.to_json(), "method": method,
                  "allocation": allocation.to_json(), "run": str(self.run.path)}
        self.run.write_json(f"evals/{result_stem(self.bits, method=method)}-"
                            f"{result.backend}.json", record)
        simulated = (f"{result.ppl_simulated:.3f} simulated, "
                     if result.ppl_simulated is not None else "")
        self.post_message(TaskDone("eval", (
            f"{model_label(method)} allocation: "
            f"perplexity {result.ppl:.3f} with {result.backend} modules, {simulated}"
            f"{result.ppl_original:.3f} unquantized ({result.eval_tokens:,} tokens of "
            f"{result.eval_text})")))

    def on_log_line(self, message: LogLine) -> None:
        self.query_one("#export-log", RichLog).write(message.message)

    def on_job_step(self, message: JobStep) -> None:
        if self.busy and not self.cancel.is_set():
            self.query_one(JobProgress).step(message.step)

    def on_task_done(self, message: TaskDone) -> None:
        if message.kind == "end":
            self.busy = False
            self.query_one(JobProgress).stop()
            self.query_one("#export-back", Button).label = "Back  esc"
            self.refresh_bindings()
            if self.query_one("#export-result", Static).has_class("busy"):
                self._result("info", "")
            return
        text = message.text
        if message.kind == "cancelled":
            started = self.query_one(JobProgress).started or time.monotonic()
            text = (f"{text} stopped after {time.monotonic() - started:.1f} s; "
                    "nothing was written")
        self._result("done", text)
        self.query_one("#export-log", RichLog).write(text)

    def _result(self, kind: str, text: str) -> None:
        result = self.query_one("#export-result", Static)
        result.set_classes(kind)
        result.update(f"[$error]{escape(text)}[/]" if kind == "error" else escape(text))


def describe(result: ExportResult, method: str = IMPQ) -> str:
    """A few lines for an ExportResult of an allocation by `method`."""
    lines = [f"exported to {result.out_dir}",
             f"the {model_label(method)} allocation: {fmt_bytes(result.bytes)} of quantized "
             f"weights (budget {fmt_bytes(result.budget_bytes)}), {result.avg_bits:.3f} bits/weight, "
             f"{fmt_bytes(result.disk_bytes)} on disk, {result.seconds:.0f} s"]
    if result.ppl is not None:
        ppl = f"perplexity {result.ppl:.3f}"
        if result.ppl_reloaded is not None:
            ppl += f", {result.ppl_reloaded:.3f} loaded back in a fresh process"
        lines.append(ppl)
    lines.extend(result.notes)
    return "\n".join(lines)
