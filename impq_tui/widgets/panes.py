"""The dashboard's two always-visible panes: SPQE progress, and the budget with what the
solver made of it."""
from __future__ import annotations

import time

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import ProgressBar, Static

from core import events as engine_events
from core.solver import Allocation

from impq_tui.analysis import (
    BITS_MAX,
    BITS_MIN,
    IMPQ,
    STABILITY_WINDOW,
    clamp_bits,
    model_label,
)
from impq_tui.report import fmt_bytes, fmt_duration, fmt_nats, level_counts
from impq_tui.widgets.layer_map import LayerMap

STATE_BADGES = {
    "preparing": ("◌ preparing", "$accent"),
    "running": ("● running", "$accent"),
    "paused": ("‖ paused", "$warning"),
    "stopping": ("◌ stopping", "$warning"),
    "completed": ("✓ completed", "$success"),
    "cancelled": ("■ stopped", "$warning"),
    "interrupted": ("■ interrupted", "$warning"),
    "failed": ("✗ failed", "$error"),
    "opened": ("○ opened", "$success"),
}


class ProgressPane(Vertical):
    """sample i/M, step k/L, rates, elapsed, ETA, device and GPU memory."""

    def compose(self) -> ComposeResult:
        yield Static(id="progress-title")
        with Horizontal(id="progress-counts-row"):
            yield Static(id="progress-counts")
            yield ProgressBar(total=1, show_eta=False, id="progress-bar")
        yield Static(id="progress-rates")

    def show(self, *, state: str, detail: str, done: int, total: int,
             progress: engine_events.Progress | None, summary: str, age_s: float = 0.0) -> None:
        """summary: the line shown while no evaluation has been timed yet; age_s: how long
        ago the writer reported `progress` (the clocks run on between its reports)."""
        badge, color = STATE_BADGES.get(state, (state, "$accent"))
        self.query_one("#progress-title", Static).update(f"[bold {color}]{badge}[/] {escape(detail)}")
        if progress is not None and state in ("running", "paused", "stopping"):
            counts = (f"sample {progress.sample}/{progress.samples}  "
                      f"step {progress.step:>2}/{progress.steps}")
            completed = (progress.sample - 1) * progress.steps + progress.step
            bar_total = progress.samples * progress.steps
        else:
            counts = f"samples {done}/{total}"
            completed, bar_total = done, max(total, 1)
        self.query_one("#progress-counts", Static).update(counts)
        self.query_one("#progress-bar", ProgressBar).update(total=bar_total, progress=min(completed, bar_total))
        self.query_one("#progress-rates", Static).update(
            rates_line(progress, state, age_s) if progress is not None else escape(summary))


class JobProgress(Horizontal):
    """A long job's progress where it runs (compare, evaluation, export): its phase, a bar
    of that phase's steps (core.events.Step), the time it has taken, ticking every second,
    and how to stop it. Hidden while no job runs."""

    DEFAULT_CSS = """
    JobProgress { height: 1; display: none; }
    JobProgress.-running { display: block; }
    JobProgress > .job-what { width: auto; margin-right: 1; }
    JobProgress > ProgressBar, JobProgress Bar { width: 1fr; }
    JobProgress > .job-clock { width: auto; margin-left: 1; color: $text-muted; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.started: float | None = None
        self.what = ""

    def compose(self) -> ComposeResult:
        yield Static(classes="job-what")
        yield ProgressBar(total=1, show_eta=False)
        yield Static(classes="job-clock")

    def on_mount(self) -> None:
        self._clock = self.set_interval(1.0, self._tick, pause=True)

    @property
    def running(self) -> bool:
        return self.started is not None

    def start(self, what: str) -> None:
        self.started = time.monotonic()
        self.add_class("-running")
        self.step(engine_events.Step(0, 1, what))
        self._tick()
        self._clock.reset()
        self._clock.resume()

    def step(self, step: engine_events.Step) -> None:
        self.what = step.what
        counts = f" {step.done}/{step.total}" if step.total > 1 else ""
        self.query_one(".job-what", Static).update(f"{escape(step.what)}{counts}")
        self.query_one(ProgressBar).update(total=max(step.total, 1), progress=min(step.done, step.total))

    def stopping(self) -> None:
        self.query_one(".job-what", Static).update(f"[$warning]stopping[/] {escape(self.what)}")

    def stop(self) -> float:
        """Hide the bar; the seconds the job took."""
        took = time.monotonic() - self.started if self.started is not None else 0.0
        self.started = None
        self._clock.pause()
        self.remove_class("-running")
        return took

    def _tick(self) -> None:
        if self.started is not None:
            elapsed = fmt_duration(time.monotonic() - self.started)
            self.query_one(".job-clock", Static).update(f"{elapsed} · esc stops")


def rates_line(progress: engine_events.Progress, state: str, age_s: float = 0.0) -> str:
    parts = [f"{progress.evals_per_s:.2f} eval/s", f"{progress.tokens_per_s:,.0f} tok/s",
             f"elapsed {fmt_duration(progress.elapsed_s + age_s)}"]
    if state == "running":
        eta = None if progress.eta_s is None else max(progress.eta_s - age_s, 0.0)
        parts.append(f"ETA {fmt_duration(eta)}")
    parts.append(progress.device)
    if progress.gpu_mem_bytes is not None:
        parts.append(f"GPU {progress.gpu_mem_bytes / 2**30:.1f} GiB")
    return " · ".join(parts)


class BudgetSlider(Widget):
    """Average bits over the run's levels (2.00 to 4.00 for the paper's): click or scroll
    with the mouse; the screen's keys step it. Posts BudgetSlider.Changed with the value
    asked for."""

    COMPONENT_CLASSES = {"budget-slider--track", "budget-slider--fill", "budget-slider--knob"}
    DEFAULT_CSS = "BudgetSlider { height: 1; width: 1fr; }"

    bits: reactive[float] = reactive(3.0)
    levels: reactive[tuple[int, ...]] = reactive((int(BITS_MIN), int(BITS_MAX)))

    class Changed(Message):
        def __init__(self, bits: float) -> None:
            super().__init__()
            self.bits = bits

    def render(self) -> Text:
        width = max(self.size.width, 3)
        lo, hi = min(self.levels), max(self.levels)
        inner = width - len(str(lo)) - len(str(hi))
        share = min(max((self.bits - lo) / (hi - lo), 0.0), 1.0)
        pos = round(share * (inner - 1))
        text = Text(str(lo), style="dim", no_wrap=True)
        fill = self.get_component_rich_style("budget-slider--fill")
        track = self.get_component_rich_style("budget-slider--track")
        knob = self.get_component_rich_style("budget-slider--knob")
        text.append("━" * pos, fill)
        text.append("●", knob)
        text.append("─" * (inner - 1 - pos), track)
        text.append(str(hi), style="dim")
        return text

    def _bits_at(self, x: int) -> float:
        lo, hi = min(self.levels), max(self.levels)
        inner = max(self.size.width - len(str(lo)) - len(str(hi)), 2)
        share = min(max((x - len(str(lo))) / (inner - 1), 0.0), 1.0)
        return clamp_bits(round((lo + share * (hi - lo)) * 20) / 20, self.levels)

    def on_click(self, event: events.Click) -> None:
        self.post_message(self.Changed(self._bits_at(event.x)))

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self.post_message(self.Changed(clamp_bits(self.bits + 0.05, self.levels)))

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self.post_message(self.Changed(clamp_bits(self.bits - 0.05, self.levels)))


class BudgetPane(Vertical):
    """The budget, the bytes it means, the allocation model and the loss increase it
    predicts, the solver, and the layers in compact form."""

    def compose(self) -> ComposeResult:
        with Horizontal(id="budget-row"):
            yield Static(id="budget-value")
            yield BudgetSlider(id="budget-slider")
        yield Static(id="budget-bytes")
        yield Static(id="budget-solver")
        yield LayerMap(compact=True, id="budget-strip")

    def show_bits(self, bits: float, budget_bytes: int | None = None) -> None:
        size = f" = {fmt_bytes(budget_bytes)}" if budget_bytes is not None else ""
        self.query_one("#budget-value", Static).update(
            f"[dim]budget[/] [bold $accent]{bits:.2f}[/] [dim]bits nominal{size}[/] ")
        self.query_one(BudgetSlider).bits = bits

    def show(self, *, bits: float, allocation: Allocation | None, full_bytes: int | None,
             dtype: str, solving: bool, unchanged: int | None, relative_se: float | None,
             samples: int, note: str = "", budget_bytes: int | None = None,
             noise: str | None = None, method: str = IMPQ, model_note: str | None = None,
             levels: tuple[int, ...] = (2, 4)) -> None:
        """bits: the budget, nominal (2 = every layer's 2-bit size, scales included; 4 the
        same at 4 bits; the run's lowest and highest `levels` likewise); budget_bytes: what it allows; noise: why the estimates are still
        noise (analysis.noise_note), if they are; method: the allocation model (IMPQ or one
        of our extensions, named as analysis.model_label names them); model_note: where
        its model stands (IMPQ-fit being fitted, or refused), if not simply ready."""
        self.show_bits(bits, budget_bytes)
        model = f"[b]{escape(model_label(method))}[/b]"
        if allocation is None:
            self.query_one("#budget-bytes", Static).update(
                f"[$warning]{escape(model_note)}[/]" if model_note and samples
                else note or "the allocation appears after the first finished sample")
            self.query_one("#budget-solver", Static).update(
                model + (" · solving…" if solving else ""))
            return
        a = allocation
        share = f" ({a.bytes / full_bytes:.0%})" if full_bytes else ""
        self.query_one("#budget-bytes", Static).update(
            f"[bold]{fmt_bytes(a.bytes)}[/] · Δloss [bold]{fmt_nats(a.predicted_delta_nll)}[/] "
            f"nats/token by {escape(model_label(method, short=True))} · {a.weight_bits:.2f} bits "
            f"nominal, {a.avg_bits:.2f} effective (with scales) · of {fmt_bytes(full_bytes)} "
            f"{dtype}{share}")
        took = f" {a.seconds * 1000:.0f} ms" if getattr(self.app, "timings", True) else ""
        solver = f"SCIP {a.status}{took}" + (" · solving…" if solving else "")
        parts = [model]
        if model_note:
            parts.append(f"[$warning]{escape(model_note)}[/]")
        parts += [solver, f"[$success]{escape(split_line(a.bits_per_layer, levels))}[/]"]
        if noise is not None:
            parts.append(f"[$warning]estimates still noise[/]: {escape(noise)}")
        if unchanged is not None:
            parts.append(f"unchanged by last {unchanged}/{min(samples - 1, STABILITY_WINDOW)} samples")
        if relative_se is not None:
            parts.append(f"max se/|φ| {relative_se:.2f}")
        self.query_one("#budget-solver", Static).update(" · ".join(parts))


def split_line(bits_per_layer, levels=(2, 4)) -> str:
    """How the layers split over the levels, short: "12/30 at 4 bits" (two levels),
    "layers at 4/3/2 bits: 10/12/8" (more)."""
    if len(levels) > 2:
        return level_counts(bits_per_layer, levels)
    top = max(levels)
    return f"{sum(b == top for b in bits_per_layer)}/{len(bits_per_layer)} at {top} bits"
