"""The run source: a run directory and the process that writes it.

The app shows every run by following its directory, whoever writes it: `impq-tui run`
started from the app (a process in a session of its own, so a closed terminal or a
quitting app does not stop it), one started under nohup, or one on another host that
shares the folder. `RunSource.follow` reads the folder whenever it changes (in a
thread: it reads files and sleeps) and hands over a Snapshot; `start`, `pause`, `resume`
and `stop` reach the writing process (core.control holds the process's side).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core import events
from core.control import CONTINUE, CONTROL, PAUSE, STOP, pid_alive, read_control
from core.errors import UserError
from core.files import read_bytes, read_tail
from core.runs import CONFIG, COSTS, LOCK, LOG, SAMPLES, STATUS, RunConfig, RunDir
from core.solver import Costs

from core.errors import EXIT_CANCELLED

POLL_S = 0.5          # how often the folder is looked at for news
STALE_S = 60.0        # a status heartbeat older than this, from another host, means the writer is gone
PROCESS_LOG = "process.log"     # what a run started from the app prints
FINAL = ("completed", "cancelled", "failed")


def fingerprint(run: RunDir) -> tuple:
    """Sizes and mtimes of the files a writer changes; differs whenever there is news."""
    out = []
    for name in (SAMPLES, STATUS, COSTS, LOG, LOCK, CONTROL):
        try:
            st = os.stat(run.path / name)
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class Writer:
    pid: int | None
    host: str | None
    alive: bool

    @property
    def here(self) -> bool:
        """A live writer on this host: one that signals reach."""
        return self.alive and self.host in (None, socket.gethostname())


def writer_of(run: RunDir, status: dict | None, started: int | None = None) -> Writer:
    """Who holds run.lock, and whether that process still runs. Reads the holder's note
    rather than taking the lock, so a watcher can never make a writer fail to start.
    started: the pid of a run this app started that may not hold the lock yet."""
    try:      # core.files: a FIFO or device in its place is refused, never read
        note = read_bytes(run.path / LOCK, "the run's lock", limit=4096).decode(errors="replace").split()
        pid, host = int(note[1]), note[3]
    except (UserError, ValueError, IndexError):
        pid, host = (status or {}).get("pid"), None
    state = (status or {}).get("state")
    if state in FINAL and status and status.get("pid") == pid:
        alive = False
    elif not pid or pid == os.getpid():
        alive = False
    elif host is None or host == socket.gethostname():
        alive = pid_alive(pid)
    else:
        alive = state == "running" and time.time() - _number(status.get("time")) < STALE_S
    if not alive and started is not None:
        return Writer(started, socket.gethostname(), True)
    return Writer(pid, host, alive)


def _number(value) -> float:
    """A time from a file someone could have edited: 0 (long ago) unless it is a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True)
class Snapshot:
    """What the run directory holds at one moment."""
    config: RunConfig
    D: np.ndarray                 # finite samples only, as every estimate uses them
    P: np.ndarray                 # the permutations behind D's rows (IMPQ-local, IMPQ-fit)
    costs: Costs | None
    status: dict | None
    writer: Writer
    progress: events.Progress | None
    controllable: bool            # the writer takes pause and continue (core.control)
    paused: bool
    log: tuple[str, ...]          # events.log, line by line
    error: str | None             # why a run this app started ended in an error

    @property
    def state(self) -> str:
        """preparing (a writer that has not reported yet) | running | paused |
        interrupted (the writer died mid-run) | completed | cancelled | failed | opened."""
        status = self.status or {}
        if self.writer.alive:
            if self.paused:
                return "paused"
            return "running" if status.get("pid") == self.writer.pid else "preparing"
        if status.get("state") in FINAL:
            return status["state"]
        return "interrupted" if status.get("state") == "running" else "opened"


def read_snapshot(run: RunDir, process: subprocess.Popen | None = None) -> Snapshot:
    """Everything on disk now. A sample line being appended is either whole or dropped.
    process: the run's process when this app started it."""
    status = None
    if run.has(STATUS):
        try:
            status = run.read_json(STATUS)
        except UserError:
            status = None     # rewritten under us; the next look reads it
        if not isinstance(status, dict):
            status = None     # not what a writer leaves: nothing to show from it
    progress = None
    if status and isinstance(status.get("progress"), dict):
        try:
            progress = events.Progress(**status["progress"])
        except TypeError:
            progress = None      # written by another version of impq-tui: no live numbers
    started = process.pid if process is not None and process.poll() is None else None
    writer = writer_of(run, status, started)
    control = read_control(run.path) or {}
    controllable = writer.here and control.get("pid") == writer.pid
    records = run.finite_samples()
    try:
        log = tuple(read_tail(run.path / LOG, "the run's log").decode(errors="replace").splitlines())
    except UserError:
        log = ()
    return Snapshot(
        config=run.config,
        D=np.asarray([r["d"] for r in records], dtype=np.float64) if records else np.empty((0, 0)),
        P=np.asarray([r["perm"] for r in records], dtype=np.int64) if records else np.empty((0, 0), np.int64),
        costs=run.costs() if run.has(COSTS) else None, status=status, writer=writer,
        progress=progress, controllable=controllable,
        paused=controllable and bool(control.get("paused")), log=log,
        error=_error(run, status, process))


def _error(run: RunDir, status: dict | None, process: subprocess.Popen | None) -> str | None:
    """Why the process this app started ended badly: the message it left in status.json,
    or the end of what it printed when it failed before it could write one."""
    if process is None or process.poll() in (None, 0, EXIT_CANCELLED, -STOP):
        return None
    if status and status.get("state") == "failed" and status.get("pid") == process.pid:
        return status.get("message") or "SPQE failed"
    try:
        lines = read_tail(run.path / PROCESS_LOG, "the run's process log",
                          limit=64 << 10).decode(errors="replace").strip().splitlines()
    except UserError:
        lines = []
    said = [line.removeprefix("impq-tui: error: ") for line in lines[-5:] if line.strip()]
    return "\n".join(said) or f"the run's process ended with exit status {process.returncode}"


class RunSource:
    """One run directory and, when this app started it, the process writing it."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.process: subprocess.Popen | None = None
        self._wake = threading.Event()

    def snapshot(self) -> Snapshot:
        return read_snapshot(self.run, self.process)

    def follow(self, post: Callable[[Snapshot], None], stop: threading.Event,
               every: float = POLL_S) -> None:
        """Post a snapshot now and whenever the folder changes or its writer starts or
        ends, until `stop` is set. Blocks: run it in a thread."""
        seen = writer = None
        while not stop.is_set():
            process = self.process
            key = (fingerprint(self.run), process and (process.pid, process.poll()),
                   writer is not None and pid_alive(writer),
                   time.monotonic() // STALE_S)     # a writer on another host that went quiet
            if key != seen:
                try:
                    snapshot = self.snapshot()
                except UserError:
                    if not self.run.has(CONFIG):
                        return          # the folder was removed (a run that failed at once)
                    raise
                writer = snapshot.writer.pid if snapshot.writer.here else None
                seen = (*key[:2], writer is not None, key[3])
                if not stop.is_set():
                    post(snapshot)
            self._wake.wait(every)
            self._wake.clear()

    def wake(self) -> None:
        """Look at the folder now (a signal was sent, a process started)."""
        self._wake.set()

    # ------------------------------------------------------------------ the process
    def start(self, samples: int | None = None) -> None:
        """Run `impq-tui run --resume DIR` in a session of its own: no signal meant for
        this terminal (SIGHUP when it closes, ctrl+c) reaches it, and it outlives the app.
        Its output goes to the run's process.log."""
        import impq_tui

        # --resume=DIR: a folder named like an option (-r) stays the folder
        command = [sys.executable, "-m", "impq_tui", "run", f"--resume={self.run.path.absolute()}"]
        if samples is not None:
            command += ["--samples", str(samples)]
        source_root = str(Path(impq_tui.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (source_root, os.environ.get("PYTHONPATH")) if p)}
        # Opened without blocking and without following a link: a FIFO or a link put in
        # the folder under that name must not freeze the app nor send output elsewhere.
        log = os.open(self.run.path / PROCESS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                      | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(log).st_mode):
                raise OSError(errno.EINVAL, f"{PROCESS_LOG} in the run folder is not a regular file")
            os.set_blocking(log, True)
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        finally:
            os.close(log)
        # reap it when it ends, so that its pid does not linger as a live-looking zombie
        threading.Thread(target=self.process.wait, daemon=True, name="run-reaper").start()

    def pause(self, pid: int) -> None:
        os.kill(pid, PAUSE)

    def resume(self, pid: int) -> None:
        os.kill(pid, CONTINUE)

    def stop(self, pid: int) -> None:
        os.kill(pid, STOP)
