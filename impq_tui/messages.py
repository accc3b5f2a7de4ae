"""Textual messages from the worker threads to the screens.

Workers never touch widgets: they post these. The ones that repeat (looks at a followed
run) override `can_replace`, so a burst that piles up in the queue while the screen is
busy collapses to the latest one.
"""
from __future__ import annotations

from textual.message import Message

from core import events
from core.solver import Allocation

from impq_tui.analysis import Fit, FrontierPoint
from impq_tui.follow import Snapshot


class LogLine(Message):
    """A line for the Log view (or the export screen's log)."""

    def __init__(self, message: str, level: str = "info") -> None:
        super().__init__()
        self.message, self.level = message, level


class RunPolled(Message):
    """What a followed run directory holds now."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RunPolled)


class Fitted(Message):
    """The quadratic model of the samples `of` (the screen's D it was made from) and the
    allocation at `bits` by the allocation model `method` (None: IMPQ-fit has no fitted
    model of these samples yet, or refused to fit them)."""

    def __init__(self, fit: Fit, bits: float, allocation: Allocation | None,
                 colors: list | None, of=None, method: str = "impq") -> None:
        super().__init__()
        self.fit, self.bits, self.allocation = fit, bits, allocation
        self.colors = colors      # K as RGB cells for the interaction view
        self.of = of
        self.method = method


class Stability(Message):
    def __init__(self, samples: int, bits: float, unchanged: int | None,
                 method: str = "impq") -> None:
        super().__init__()
        self.samples, self.bits, self.unchanged = samples, bits, unchanged
        self.method = method


class ModelFitted(Message):
    """The dashboard's IMPQ-fit worker ended: its FitResult (analysis.FitResult), or None
    when it was cancelled."""

    def __init__(self, worker, result) -> None:
        super().__init__()
        self.worker, self.result = worker, result


class SolveEnded(Message):
    """The dashboard's solve worker is done (answered, cancelled or failed)."""

    def __init__(self, worker) -> None:
        super().__init__()
        self.worker = worker


class FrontierReady(Message):
    """The frontier of `samples` samples: the budgets solved so far (coarse ones first),
    all of them when `complete`."""

    def __init__(self, samples: int, points: list[FrontierPoint], complete: bool = True,
                 method: str = "impq") -> None:
        super().__init__()
        self.samples, self.points, self.complete = samples, points, complete
        self.method = method

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, FrontierReady)     # newer points, or newer samples'


class JobStep(Message):
    """A long job's progress (core.events.Step): compare, evaluation, export."""

    def __init__(self, step: events.Step) -> None:
        super().__init__()
        self.step = step

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobStep)


class CompareDone(Message):
    """A comparison with the baselines ended: its result, or the message why not."""

    def __init__(self, result, error: str | None, cancelled: bool = False) -> None:
        super().__init__()
        self.result = result
        self.error = error
        self.cancelled = cancelled      # stopped on request: error says so, it is no failure
