"""Following a run directory another process writes (`impq-tui run` under nohup, on a
cluster node): cheap change detection for a timer, and a snapshot read in a worker."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import numpy as np

from core import events
from core.errors import UserError
from core.runs import COSTS, LOCK, SAMPLES, STATUS, RunDir

STALE_S = 60.0   # a status heartbeat older than this, from another host, means the writer is gone


def fingerprint(run: RunDir) -> tuple:
    """Sizes and mtimes of the files a writer changes; differs whenever there is news."""
    out = []
    for name in (SAMPLES, STATUS, COSTS):
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


def writer_of(run: RunDir, status: dict | None) -> Writer:
    """Who holds run.lock, and whether that process still runs. Reads the holder's note
    rather than taking the lock, so a watcher can never make a writer fail to start."""
    try:
        note = (run.path / LOCK).read_text().split()
        pid, host = int(note[1]), note[3]
    except (OSError, ValueError, IndexError):
        pid, host = (status or {}).get("pid"), None
    state = (status or {}).get("state")
    if state in ("completed", "cancelled", "failed") and status and status.get("pid") == pid:
        return Writer(pid, host, False)
    if not pid or pid == os.getpid():
        return Writer(pid, host, False)
    if host is None or host == socket.gethostname():
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    else:
        alive = state == "running" and time.time() - float(status.get("time", 0)) < STALE_S
    return Writer(pid, host, alive)


@dataclass(frozen=True)
class Snapshot:
    indices: tuple[int, ...]      # the sample index m of each row of D
    D: np.ndarray
    status: dict | None
    writer: Writer
    progress: events.Progress | None
    costs_ready: bool


def read_snapshot(run: RunDir) -> Snapshot:
    """Everything on disk now. A sample line being appended is either whole or dropped."""
    status = None
    if run.has(STATUS):
        try:
            status = run.read_json(STATUS)
        except UserError:
            status = None     # rewritten under us; the next poll reads it
    progress = None
    if status and isinstance(status.get("progress"), dict):
        try:
            progress = events.Progress(**status["progress"])
        except TypeError:
            progress = None
    records = run.finite_samples()
    D = np.asarray([r["d"] for r in records], dtype=np.float64) if records else np.empty((0, 0))
    return Snapshot(indices=tuple(r["m"] for r in records), D=D, status=status, writer=writer_of(run, status), progress=progress,
                    costs_ready=run.has(COSTS))
