"""Pause, continue and stop a run from outside the process that writes it.

The app starts SPQE as a process of its own (`impq-tui run`) and talks to it with signals:

    SIGUSR1   pause between evaluations (the evaluation in flight finishes first)
    SIGUSR2   continue
    SIGTERM   stop; the sample in flight is dropped (the run command's own handler)

A process that takes SIGUSR1/SIGUSR2 says so in the run directory's control.json, with
its pid and whether it is paused: a signal whose default action is to terminate is sent
only to a process that handles it, and whoever follows the run can show it paused.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

from core.errors import UserError
from core.files import read_bytes
from core.runs import write_atomic

CONTROL = "control.json"
PAUSE, CONTINUE, STOP = signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM


def install_run_controls(cancel: threading.Event, pause: threading.Event, run_dir: Path) -> None:
    """Take SIGUSR1 (set `pause`) and SIGUSR2 (clear it) in this process, and record in
    run_dir/control.json that it does. Call from the main thread before the engine starts;
    the engine waits between evaluations while `pause` is set and `cancel` is not."""
    path = Path(run_dir) / CONTROL

    def record() -> None:
        with contextlib.suppress(OSError):   # the pause itself matters more than its record
            write_atomic(path, json.dumps({"pid": os.getpid(), "paused": pause.is_set()}) + "\n")

    def on_pause(_signum, _frame) -> None:
        if not cancel.is_set():
            pause.set()
            record()

    def on_continue(_signum, _frame) -> None:
        pause.clear()
        record()

    signal.signal(PAUSE, on_pause)
    signal.signal(CONTINUE, on_continue)
    record()


def read_control(run_dir: Path) -> dict | None:
    """control.json as its writer left it, or None (no such file, or being replaced)."""
    try:      # core.files: a FIFO or a device in its place is refused, never read
        data = json.loads(read_bytes(Path(run_dir) / CONTROL, "the run's control file", limit=1 << 16))
    except (UserError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None



def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs. A zombie (ended, not yet reaped: some
    containers' init never reaps) counts as gone; another user's process as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True      # no /proc here
