"""Export the allocation at the chosen budget: pick a backend and a folder, optionally
measure perplexity first (core.evaluate), then write a model ordinary tools load
(core.export, shared with the headless CLI)."""
from __future__ import annotations

import importlib
import threading
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.markup import escape
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, RichLog, Select, Static
from textual.worker import get_current_worker

from core import events
from core.errors import UserError
from core.runs import RunDir
from core.spqe import Cancelled
from core.solver import Allocation

from impq_tui.analysis import fmt_bytes
from impq_tui.messages import EngineLog


def export_module():
    """core.export, or None where this installation does not have it yet."""
    try:
        return importlib.import_module("core.export")
    except ModuleNotFoundError as exc:
        if exc.name in ("core.export",):
            return None
        raise


class TaskDone(Message):
    def __init__(self, kind: str, text: str) -> None:
        super().__init__()
        self.kind, self.text = kind, text


class ExportScreen(Screen):
    BINDINGS = [
        Binding("f5", "export", "Export"),
        Binding("f6", "evaluate", "Evaluate"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, run: RunDir, allocation: Allocation, bits: float) -> None:
        super().__init__()
        self.run, self.allocation, self.bits = run, allocation, bits
        self.module = export_module()
        self.backends: tuple[str, ...] = tuple(getattr(self.module, "EXPORT_BACKENDS", ())) if self.module else ()
        self.busy = False
        self.cancel = threading.Event()      # export_model stops between its steps

    def compose(self) -> ComposeResult:
        a = self.allocation
        high = sum(b == 4 for b in a.bits_per_layer)
        backend = self.run.config.backend if self.run.config.backend in self.backends else (
            self.backends[0] if self.backends else self.run.config.backend)
        with Vertical(id="export"):
            yield Static(f"[b]Export[/b] the allocation at [b]{self.bits:.2f}[/b] bits: {high} of "
                         f"{len(a.bits_per_layer)} layers at 4 bits, {fmt_bytes(a.bytes)} "
                         f"({a.avg_bits:.3f} bits/weight with metadata)", id="export-title")
            if self.module is None:
                yield Static("[$warning]Export is not available in this installation yet (no "
                             "core.export). You can still measure the perplexity of this "
                             "allocation with F6.[/]", id="export-unavailable")
            with Grid(id="export-form"):
                yield Label("Backend")
                choices = self.backends or (self.run.config.backend,)
                yield Select([(b, b) for b in choices], value=backend, allow_blank=False,
                             id="export-backend", compact=True, disabled=self.module is None)
                yield Label("Output folder")
                yield Input(self._default_out(backend), id="export-out", compact=True,
                            disabled=self.module is None)
                yield Label("Perplexity")
                yield Checkbox("measure the quantized model", False, id="export-eval", compact=True,
                               disabled=self.module is None)
                yield Label("Verify")
                yield Checkbox("load the export back in a fresh process (README snippet)", False,
                               id="export-verify", compact=True,
                               disabled=not self._supports("verify"))
                yield Label("Evaluation text")
                yield Input("builtin", id="export-eval-text", compact=True)
                yield Label("Existing folder")
                yield Checkbox("overwrite it", False, id="export-force", compact=True,
                               disabled=self.module is None)
            with Horizontal(id="export-buttons"):
                yield Button("Export  F5", id="export-go", variant="primary", compact=True,
                             disabled=self.module is None)
                yield Button("Evaluate  F6", id="export-evaluate", compact=True)
                yield Button("Back  esc", id="export-back", compact=True)
            yield Static(id="export-result")
            yield RichLog(id="export-log", markup=False, wrap=True)
        yield Footer()

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = self.app.cursor_blink

    def _supports(self, option: str) -> bool:
        """Whether core.export.export_model takes this keyword (it grew them over time)."""
        if self.module is None:
            return False
        import inspect

        return option in inspect.signature(self.module.export_model).parameters

    def _default_out(self, backend: str) -> str:
        return str(self.run.path / "exports" / f"{backend}-{self.bits:.2f}")

    @on(Select.Changed, "#export-backend")
    def _backend_changed(self, event: Select.Changed) -> None:
        out = self.query_one("#export-out", Input)
        if Path(out.value).parent == self.run.path / "exports":
            out.value = self._default_out(str(event.value))

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
        if action == "export":
            return False if self.module is None else (None if self.busy else True)
        if action == "evaluate":
            return None if self.busy else True
        return True

    def action_back(self) -> None:
        if self.busy:
            self.cancel.set()
            self.app.notify("Stopping the export after its current step…", timeout=4)
            return
        self.dismiss()

    def action_evaluate(self) -> None:
        self._start(export=False)

    def action_export(self) -> None:
        if self.module is None:
            return
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
        self.app.run_worker(lambda: self._work(**options), name="export", group="export",
                            exclusive=True, thread=True, exit_on_error=False)

    def _work(self, *, export: bool, evaluate: bool, verify: bool, backend: str, out: str,
              force: bool, eval_text: str) -> None:
        """On a worker thread: post messages only."""
        worker = get_current_worker()

        def callback(event: events.Event) -> None:
            if isinstance(event, events.Log):
                self.post_message(EngineLog(event.message, event.level))

        bits = list(self.allocation.bits_per_layer)
        try:
            if not export:
                self._evaluate(bits, backend, eval_text, callback)
                return
            options = {"force": force, "target_bits": self.bits, "callback": callback}
            for name, value in (("evaluate", evaluate), ("verify", verify),
                                ("eval_text", eval_text), ("cancel", self.cancel)):
                if self._supports(name):
                    options[name] = value
            if evaluate and not self._supports("evaluate"):
                self._evaluate(bits, backend, eval_text, callback)
            if not worker.is_cancelled:
                exported = self.module.export_model(self.run, bits, backend, out, **options)
                self.post_message(TaskDone("export", describe(exported)))
        except Cancelled:
            self.post_message(TaskDone("done", "export stopped; nothing was written"))
        finally:
            self.post_message(TaskDone("end", ""))

    def _evaluate(self, bits: list[int], backend: str, eval_text: str, callback) -> None:
        """Perplexity with the real backend's modules, simulated, and unquantized; saved in
        the run's evals/ as `impq-tui eval` saves it."""
        from core.evaluate import evaluate_allocation

        result = evaluate_allocation(self.run, bits, eval_text=eval_text, backend=backend,
                                     callback=callback)
        record = {**result.to_json(), "allocation": self.allocation.to_json(),
                  "run": str(self.run.path)}
        from core.evaluate import result_stem

        self.run.write_json(f"evals/{result_stem(self.bits)}-{result.backend}.json", record)
        self.post_message(TaskDone("eval", (
            f"perplexity {result.ppl:.3f} with {result.backend} modules, "
            f"{result.ppl_simulated:.3f} simulated, {result.ppl_original:.3f} unquantized "
            f"({result.eval_tokens:,} tokens of {result.eval_text})")))

    def on_engine_log(self, message: EngineLog) -> None:
        self.query_one("#export-log", RichLog).write(message.message)

    def on_task_done(self, message: TaskDone) -> None:
        if message.kind == "end":
            self.busy = False
            self.refresh_bindings()
            if self.query_one("#export-result", Static).has_class("busy"):
                self._result("info", "")
            return
        self._result("done", message.text)
        self.query_one("#export-log", RichLog).write(message.text)

    def _result(self, kind: str, text: str) -> None:
        result = self.query_one("#export-result", Static)
        result.set_classes(kind)
        result.update(f"[$error]{escape(text)}[/]" if kind == "error" else escape(text))


def describe(result) -> str:
    """A few lines for an ExportResult."""
    get = lambda name, default=None: getattr(result, name, default)
    lines = [f"exported to {get('out_dir', '?')}"]
    if get("bytes") is not None:
        lines.append(f"{fmt_bytes(get('bytes'))} of quantized weights (budget "
                     f"{fmt_bytes(get('budget_bytes'))}), {get('avg_bits', 0):.3f} bits/weight, "
                     f"{fmt_bytes(get('disk_bytes'))} on disk, {get('seconds', 0):.0f} s")
    if get("ppl") is not None:
        ppl = f"perplexity {get('ppl'):.3f}"
        if get("ppl_reloaded") is not None:
            ppl += f", {get('ppl_reloaded'):.3f} loaded back in a fresh process"
        lines.append(ppl)
    lines.extend(get("notes", ()) or ())
    return "\n".join(lines)
