"""Typed messages the engine emits through its callback.

The engine knows nothing about who listens: the Textual app turns these into messages
that merge when they pile up, the headless CLI into a rich progress display.
All are small frozen dataclasses; vectors are tuples so they stay immutable.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class Progress:
    """A tick after each evaluation of v(S)."""
    sample: int            # 1-based index of the sample in flight
    samples: int           # M, the samples this run aims for
    step: int              # layer step k within the sample, 0..L
    steps: int             # L
    evals: int             # evaluations done in this process
    evals_per_s: float
    tokens_per_s: float    # calibration tokens pushed through a full-model equivalent per second
    elapsed_s: float
    eta_s: float | None
    device: str
    gpu_mem_bytes: int | None = None


@dataclass(frozen=True)
class SampleDone:
    """A finished SPQE sample: its permutation and its marginal vector d_m."""
    index: int                         # 0-based sample index m
    permutation: tuple[int, ...]
    d: tuple[float, ...]
    v_high: float                      # v(S_0), every layer at high precision
    v_low: float                       # v(S_L), every layer at low precision
    finite: bool = True                # False: a loss was NaN/inf; kept out of the estimates


@dataclass(frozen=True)
class Step:
    """Progress of a job other than SPQE (compare, eval, export): step `done` of `total`
    of its current phase `what` ("quantizing layers", "evaluating allocations")."""
    done: int
    total: int
    what: str


@dataclass(frozen=True)
class Log:
    message: str
    level: str = "info"    # info | warning | error


@dataclass(frozen=True)
class Failed:
    """The engine stopped on an error; `message` is readable by a user."""
    message: str
    user_error: bool = True


@dataclass(frozen=True)
class Finished:
    """The run ended. status: completed | cancelled | failed."""
    status: str
    samples: int
    run_dir: str = ""


Event = Union[Progress, SampleDone, Step, Log, Failed, Finished]
Callback = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """A callback that listens to nothing."""


# ------------------------------------------------------------------ the other way: cancel
# The caller's threading.Event travels into the engine; these are how a job looks at it.

def check_cancel(cancel: threading.Event | None) -> None:
    """Raise core.spqe.Cancelled once `cancel` is set."""
    if cancel is not None and cancel.is_set():
        from core.errors import Cancelled

        raise Cancelled


# Progress within a phase: after step `done` of `total` of `what` ("converting to GGUF").
Substep = Callable[[int, int, str], None]


class Phases:
    """The phases of a long job (eval, export): `phase(what, message)` stops the job if
    `cancel` is set, logs `message` and reports Step(done, total, what); `log(message)`
    only checks and logs; `substep(done, total, what)` checks and reports the progress of
    a step within the phase; `done()` reports the last step."""

    def __init__(self, callback: Callback, total: int, cancel: threading.Event | None) -> None:
        self.callback, self.total, self.cancel, self.count = callback, total, cancel, 0
        self._substep: Step | None = None

    def log(self, message: str) -> None:
        check_cancel(self.cancel)
        self.callback(Log(message))

    def substep(self, done: int, total: int, what: str) -> None:
        """Progress within the current phase (the tensors a conversion has written): stops
        the job if `cancel` is set; reports Step(done, total, what) unless that is the step
        it reported last, so a caller waiting on a child process calls it as often as it
        looks at the child (a cancel is then seen within that interval)."""
        check_cancel(self.cancel)
        step = Step(done, total, what)
        if step != self._substep:
            self._substep = step
            self.callback(step)

    def __call__(self, what: str, message: str) -> None:
        self.log(message)
        self.callback(Step(self.count, self.total, what))
        self.count += 1
        self._substep = None

    def done(self) -> None:
        self.callback(Step(self.total, self.total, "done"))


@contextlib.contextmanager
def cancel_between_layers(layers, cancel: threading.Event | None):
    """Within the block, each of `layers` (the model's decoder layers, torch modules)
    checks `cancel` before it runs (a forward pre-hook): a perplexity pass or a baseline's
    scoring stops within one layer's forward once it is set, not at the end of the pass."""
    if cancel is None:
        yield
        return
    hooks = [layer.register_forward_pre_hook(lambda _module, _args: check_cancel(cancel))
             for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
