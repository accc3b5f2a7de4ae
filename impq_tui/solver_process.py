"""The dashboard's numbers in a process of its own: fits, SCIP's solves, the stability
check and the frontier never share the app's GIL or wait for its imports.

In a thread of the app they did both: building the program of an 80-layer model is Python
holding the GIL for a fifth of a second, SCIP's copy of a program holds it too, and the
first colouring of K imports matplotlib; the event loop's timer then woke late (lag p99
over 100 ms, issue 12). The child is started when a run opens (with the app, for
`impq-tui --run DIR`), so its imports (numpy, pyscipopt) are paid while the app starts
and draws, and it is kept while the dashboard is: the
programs core.solver built and the allocations it solved (analysis.Allocations) are
reused across budget moves, samples and the frontier. It runs at a lower priority
(os.nice) so that the event loop has a core when it needs one.

    solver = SolverProcess()                        the child starts now
    for reply in solver.solve(SolveJob(...), cancelled): ...     ("solved", fit, allocation),
                                                    ("colors", cells, legend), ("unchanged", k)
    for points, complete in solver.frontier(FrontierJob(...), cancelled): ...
    solver.close()                                  kills it

Each call blocks (call it from a worker thread) and yields the child's replies as they
come; `cancelled()` is polled while waiting, and once it says so the child is told and the
call returns. Jobs go by channel, "solve" and "frontier": one at a time on each, a newer
job cancelling the older one of its channel, the two channels at once (threads of the
child; SCIP releases the GIL while it optimizes). The frontier waits while a budget's own
solve is in work, so a moved budget never waits for it; K's colours and the stability
check wait for the frontier (the one on screen, or asked for while no run competes for the
CPU), which is solved FRONTIER_WORKERS budgets at a time. The child
ends when the app's end of its pipe closes: it never outlives the app, however it ends.
"""
from __future__ import annotations

import itertools
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Iterator

import numpy as np

NICE = 10          # the child's niceness over the app's (os.nice): the event loop comes first
FRONTIER_WORKERS = max(1, min(4, os.cpu_count() or 1))   # SCIP solves at once for the frontier
POLL_S = 0.05      # how often a waiting call looks at cancelled()
CHANNELS = ("solve", "frontier")


@dataclass(frozen=True)
class SolveJob:
    """The allocation at `bits` by `method` (analysis.MODELS) of the samples D (walks P),
    and how many of the last samples left it unchanged (analysis.unchanged_for). fit: also
    the quadratic model and its settle curve (analysis.fit) and K's colours, for samples
    the screen has no fit of yet. states: IMPQ-fit's model (analysis.FitResult), if any."""
    D: np.ndarray
    P: np.ndarray
    costs: object                 # core.solver.Costs
    bits: float
    method: str = "impq"
    paired: bool = False
    fit: bool = True
    states: object | None = None  # analysis.FitResult


@dataclass(frozen=True)
class FrontierJob:
    """The frontier of D by `method` (analysis.frontier_progress), coarse budgets first,
    sent at most every `every_s` (the plot is redrawn once per batch)."""
    D: np.ndarray
    P: np.ndarray
    costs: object
    method: str = "impq"
    paired: bool = False
    fitted: object | None = None   # core.fit.FittedModel, for IMPQ-fit
    every_s: float = 0.25


class SolverProcess:
    """The app's end of the child (module doc). Thread-safe: several worker threads call
    it at once. A child that died (killed, crashed) is started again by the next call."""

    def __init__(self, nice: int = NICE) -> None:
        self.nice = nice
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        # each waiting call's reply box, with the child it asked
        self._replies: dict[int, tuple[queue.SimpleQueue, subprocess.Popen]] = {}
        self._process: subprocess.Popen | None = None
        self._to: Connection | None = None
        self._stderr = None
        self._live = False               # the child's replies are being read
        self._closed = False
        with self._lock:
            self._start()

    @property
    def pid(self) -> int | None:
        """The child's process id (None once closed)."""
        return None if self._process is None else self._process.pid

    def solve(self, job: SolveJob, cancelled: Callable[[], bool] = lambda: False) -> Iterator[tuple]:
        return self._request("solve", "solve", job, cancelled)

    def frontier(self, job: FrontierJob, cancelled: Callable[[], bool] = lambda: False
                 ) -> Iterator[tuple[list, bool]]:
        return self._request("frontier", "frontier", job, cancelled)

    def info(self) -> dict:
        """What the child holds: its pid, the programs core.solver keeps and how many
        it has built, and the allocations it has solved (for tests)."""
        for reply in self._request("info", "info", None, lambda: False):
            return reply
        raise RuntimeError("the solver process did not answer")

    def close(self) -> None:
        """Kill the child now (the dashboard goes away); later calls answer nothing."""
        with self._lock:
            self._closed = True
            process, conn = self._process, self._to
        if process is not None and process.poll() is None:
            try:
                process.kill()
            except OSError:
                pass
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ the app's side
    def _start(self) -> None:
        """Start the child (self._lock held)."""
        import core

        root = os.path.dirname(os.path.dirname(os.path.abspath(core.__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        if self._to is not None:          # of a child that died
            self._to.close()
        to_child, from_app = os.pipe()
        from_child, to_app = os.pipe()
        self._stderr = tempfile.TemporaryFile()     # read once the child has died
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", "from impq_tui.solver_process import child; child()",
                 str(to_child), str(to_app), str(self.nice)],
                pass_fds=(to_child, to_app), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        finally:
            os.close(to_child)
            os.close(to_app)
        self._to = Connection(from_app, readable=False)
        self._live = True
        replies = Connection(from_child, writable=False)
        threading.Thread(target=self._read, args=(replies, self._process, self._stderr), daemon=True,
                         name="impq-solver-replies").start()

    def _read(self, conn: Connection, process: subprocess.Popen, stderr) -> None:
        """Hand each reply to the call waiting for it; when the child ends, tell them all."""
        while True:
            try:
                rid, kind, value = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                box = self._replies.get(rid, (None, None))[0]
            if box is not None:          # none: a call that stopped waiting (cancelled)
                box.put((kind, value))
        conn.close()
        why = self._death(process, stderr)      # reaped here: no zombie left
        with self._lock:
            if self._process is process:
                self._live = False       # the next call starts another
            # the calls that asked this child; not those already asking a new one
            waiting = [box for box, asked in self._replies.values() if asked is process]
        for box in waiting:
            box.put(("ended", why))

    @staticmethod
    def _death(process: subprocess.Popen, stderr) -> str:
        code = process.wait()
        said = ""
        try:
            stderr.seek(0)
            lines = stderr.read().decode(errors="replace").strip().splitlines()
            said = f": {lines[-1]}" if lines else ""
            stderr.close()
        except (OSError, ValueError):
            pass
        return f"the solver process ended with exit status {code}{said}"

    def _request(self, channel: str, op: str, job, cancelled: Callable[[], bool]) -> Iterator:
        rid, box = next(self._ids), queue.SimpleQueue()
        with self._lock:
            if self._closed:     # the screen went away: nothing to answer, nobody to show it
                return
            # killed or crashed: a fresh one, also when the child has ended and the reply
            # reader has not said so yet
            if not self._live or self._process.poll() is not None:
                self._start()
            self._replies[rid] = (box, self._process)
        done = False
        try:
            self._send((rid, channel, op, job))
            while True:
                try:
                    kind, value = box.get(timeout=POLL_S)
                except queue.Empty:
                    kind = None
                if cancelled():          # replies that came meanwhile are stale too
                    return
                if kind is None:
                    continue
                if kind == "reply":
                    yield value
                elif kind == "end":
                    done = True
                    return
                elif kind == "error":
                    done = True
                    raise value
                else:            # "ended"
                    done = True
                    if self._closed:
                        return
                    raise RuntimeError(value)
        finally:
            with self._lock:
                self._replies.pop(rid, None)
            if not done:         # cancelled, or the caller stopped reading
                try:
                    self._send((rid, channel, "cancel", None))
                except RuntimeError:
                    pass

    def _send(self, message) -> None:
        with self._send_lock:
            try:
                self._to.send(message)
            except (OSError, ValueError) as exc:    # the child died, or was closed
                if self._closed:
                    return
                raise RuntimeError(f"the solver process is gone: {exc}") from None


# ---------------------------------------------------------------------- the child

class _Child:
    """The child's state: the allocations solved per (costs, paired), the jobs in work by
    channel, which are cancelled, and whether a budget's own solve is in work."""

    def __init__(self, out: Connection) -> None:
        self.out = out
        self.out_lock = threading.Lock()
        self.lock = threading.Lock()
        self.allocations: dict[tuple, object] = {}
        self.latest: dict[str, int] = {}          # channel -> id of its newest job
        self.cancelled: set[int] = set()
        self.queues = {channel: queue.SimpleQueue() for channel in CHANNELS}
        self.budget_free = threading.Event()      # no budget's own solve in work
        self.budget_free.set()
        self.frontier_free = threading.Event()    # no frontier in work
        self.frontier_free.set()

    def send(self, rid: int, kind: str, value=None) -> None:
        with self.out_lock:
            self.out.send((rid, kind, value))

    def is_cancelled(self, rid: int, channel: str) -> bool:
        with self.lock:
            return rid in self.cancelled or self.latest.get(channel) != rid

    def allocations_for(self, costs, paired: bool):
        from impq_tui.analysis import Allocations

        with self.lock:
            key = (costs, paired)
            if key not in self.allocations:
                self.allocations = {key: Allocations(costs, paired=paired)}   # one run's
            return self.allocations[key]

    def serve(self, channel: str) -> None:
        """One channel's jobs, one at a time, the newest only."""
        jobs = self.queues[channel]
        while True:
            rid, op, job = jobs.get()
            if self.is_cancelled(rid, channel):     # superseded before it started
                self.send(rid, "end")
                continue
            try:
                HANDLERS[op](self, job, lambda value, r=rid: self.send(r, "reply", value),
                             lambda r=rid: self.is_cancelled(r, channel))
                self.send(rid, "end")
            except Exception as exc:      # sent back: the app's worker raises it
                self.send(rid, "error", _portable(exc))
            finally:
                with self.lock:
                    self.cancelled.discard(rid)


def _portable(exc: Exception) -> Exception:
    """The exception as it can cross the pipe: itself when it pickles and unpickles, else
    a UserError or RuntimeError saying the same, with the child's traceback for a bug."""
    from core.errors import UserError

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        if isinstance(exc, UserError):
            return UserError(str(exc))
        tb = "".join(traceback.format_exception(exc)).strip().splitlines()
        return RuntimeError(f"{type(exc).__name__}: {exc} ({tb[-2].strip() if len(tb) > 1 else ''})")


def _solve(child: _Child, job: SolveJob, send, cancelled) -> None:
    from core.results import IMPQ, IMPQ_FIT
    from impq_tui import analysis

    allocations = child.allocations_for(job.costs, job.paired)
    child.budget_free.clear()                 # the frontier waits for this one
    try:
        fit = analysis.fit(job.D, paired=job.paired, steps=job.costs.steps) if job.fit else None
        if job.method == IMPQ:
            allocation = allocations.get(job.D, job.bits, fit.model if fit is not None else None)
        elif job.method != IMPQ_FIT:
            allocation = allocations.get(job.D, job.bits, method=job.method, perms=job.P)
        elif job.states is not None and job.states.model is not None:
            allocation = allocations.get(job.states.D, job.bits, method=job.method,
                                         perms=job.states.P, fitted=job.states.model)
        else:
            allocation = None                 # being fitted, or core.fit refused
    finally:
        child.budget_free.set()
    if cancelled():
        return
    send(("solved", fit, allocation))

    def after_the_frontier() -> bool:
        while not child.frontier_free.wait(POLL_S):
            if cancelled():
                return True
        return cancelled()

    # K's colours (the first import matplotlib) and the stability check wait for the frontier
    if fit is not None and np.any(fit.layer_K) and not after_the_frontier():
        send(("colors", analysis.diverging_colors(fit.layer_K), analysis.legend_colors()))
    unchanged = analysis.unchanged_for(job.D, allocations, job.bits, method=job.method,
                                       perms=job.P, cancelled=after_the_frontier)
    if not cancelled():
        send(("unchanged", unchanged))


def _frontier(child: _Child, job: FrontierJob, send, cancelled) -> None:
    from impq_tui import analysis

    allocations = child.allocations_for(job.costs, job.paired)

    def stop() -> bool:
        while not child.budget_free.wait(POLL_S):   # a budget's own solve goes first
            if cancelled():
                return True
        return cancelled()

    child.frontier_free.clear()
    try:
        for points, complete in analysis.frontier_progress(
                job.D, allocations, method=job.method, perms=job.P, fitted=job.fitted,
                cancelled=stop, every_s=job.every_s, workers=FRONTIER_WORKERS):
            send((points, complete))
    finally:
        child.frontier_free.set()


def _info(child: _Child, job, send, cancelled) -> None:
    from core import solver

    with solver._programs_lock:
        programs = list(solver._PROGRAMS.values())
    with child.lock:
        solved = sum(len(a._cache) for a in child.allocations.values())
    send({"pid": os.getpid(), "nice": os.nice(0), "programs": len(programs),
          "built": sum(len(p.built) for p in programs), "allocations": solved})


HANDLERS = {"solve": _solve, "frontier": _frontier, "info": _info}


def child() -> None:
    """The child's main (argv: the fd it reads jobs from, the fd it answers on, niceness)."""
    jobs_fd, replies_fd, nice = map(int, sys.argv[1:4])
    try:
        os.nice(nice)
    except OSError:
        pass
    jobs, out = Connection(jobs_fd, writable=False), Connection(replies_fd, readable=False)
    import impq_tui.analysis  # noqa: F401  (numpy, pyscipopt, core.solver: before the first job)

    state = _Child(out)
    for channel in CHANNELS:
        threading.Thread(target=state.serve, args=(channel,), daemon=True,
                         name=f"solver-{channel}").start()
    while True:
        try:
            rid, channel, op, job = jobs.recv()
        except (EOFError, OSError):
            os._exit(0)           # the app is gone: so is this process, whatever is in work
        if op == "cancel":
            with state.lock:
                state.cancelled.add(rid)
        elif op == "info":
            threading.Thread(target=state_info, args=(state, rid), daemon=True).start()
        else:
            with state.lock:
                state.latest[channel] = rid      # the older job of this channel is stale
            state.queues[channel].put((rid, op, job))


def state_info(state: _Child, rid: int) -> None:
    _info(state, None, lambda value: state.send(rid, "reply", value), lambda: False)
    state.send(rid, "end")
