"""The run picker: the runs under a folder (./runs by default), newest first, with their
model, backend, samples, state and last update. Enter opens one (as `impq-tui --run DIR`),
n starts a new one on the form.

The folder is read by a thread worker, again every few seconds while the picker is on
screen (a run in progress moves on, a writer dies). A run whose files did not change and
that nobody was writing is not read again. A folder that cannot be read as a run is
listed as damaged, with the reason, never a crash.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.markup import escape
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual.worker import get_current_worker

from core.errors import UserError
from core.runs import CONFIG, SAMPLES, STATUS, RunConfig, RunDir
from impq_tui.follow import fingerprint, read_snapshot

RESCAN_S = 3.0
LIVE = ("preparing", "running", "paused")
# The picker's words for Snapshot.state
STATES = {"completed": "finished", "cancelled": "stopped", "opened": "not running"}
STATE_STYLES = {"running": "bold green", "preparing": "green", "paused": "yellow",
                "interrupted": "yellow", "finished": "", "stopped": "yellow",
                "failed": "bold red", "damaged": "bold red", "not running": "dim"}


@dataclass(frozen=True)
class RunInfo:
    """One folder under the runs folder, as the picker lists it."""
    path: Path
    config: RunConfig | None = None
    state: str = "damaged"
    pid: int | None = None
    done: int = 0
    updated: float | None = None          # the newest mtime of the run's files
    problem: str | None = None            # why it is damaged
    layers: int | None = None
    sample_seconds: tuple[float, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def live(self) -> bool:
        return self.state in LIVE


def looks_like_run(path: Path) -> bool:
    """A folder holding any file a run writes (a damaged run too, not unrelated folders)."""
    return path.is_dir() and any((path / name).exists() for name in (CONFIG, SAMPLES, STATUS))


def read_run(path: Path) -> RunInfo:
    """What the picker shows of one run folder; damage becomes state "damaged"."""
    updated = _newest_mtime(path)
    try:
        run = RunDir.open(path)
        snapshot = read_snapshot(run)
        records = run.samples()
    except UserError as exc:
        return RunInfo(path, updated=updated, problem=str(exc))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # files of the wrong shape (a list where an object belongs, a missing field)
        return RunInfo(path, updated=updated,
                       problem=f"{path} cannot be read as a run ({type(exc).__name__}: {exc}).")
    state = STATES.get(snapshot.state, snapshot.state)
    writer = snapshot.writer
    steps = max(1, len(snapshot.config.levels) - 1)      # D has a column per drop
    layers = snapshot.D.shape[1] // steps if snapshot.D.size else (
        len(snapshot.costs.m_lo) if snapshot.costs is not None else None)
    return RunInfo(path, config=snapshot.config, state=state,
                   pid=writer.pid if writer.alive else None, done=len(snapshot.D),
                   updated=updated, layers=layers,
                   sample_seconds=tuple(float(r["seconds"]) for r in records
                                        if isinstance(r.get("seconds"), (int, float))))


def _newest_mtime(path: Path) -> float | None:
    stamps = [entry[1] for entry in fingerprint(RunDir(path)) if entry is not None]
    try:
        stamps.append(os.stat(path / CONFIG).st_mtime_ns)
    except OSError:
        pass
    return max(stamps) / 1e9 if stamps else None


class RunScan:
    """The runs under one folder, re-read only where something changed."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._seen: dict[Path, tuple[tuple, RunInfo]] = {}

    def scan(self) -> list[RunInfo]:
        """Every run folder under the folder, newest first. Blocks: run it in a thread."""
        try:
            folders = sorted(p for p in self.folder.iterdir() if looks_like_run(p))
        except OSError:
            return []
        runs = []
        for path in folders:
            key = fingerprint(RunDir(path)), _config_stamp(path)
            seen = self._seen.get(path)
            if seen is not None and seen[0] == key and not seen[1].live:
                info = seen[1]
            else:
                info = read_run(path)
                self._seen[path] = (key, info)
            runs.append(info)
        return sorted(runs, key=lambda r: (r.updated or 0, r.name), reverse=True)


def _config_stamp(path: Path):
    try:
        st = os.stat(path / CONFIG)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def fmt_updated(stamp: float | None, now: float | None = None) -> str:
    """"42 s ago", "3 min ago", "5 h ago" within a day; the local date and time after."""
    if stamp is None:
        return "-"
    age = max((now or time.time()) - stamp, 0)
    if age < 60:
        return f"{age:.0f} s ago"
    if age < 3600:
        return f"{age // 60:.0f} min ago"
    if age < 86400:
        return f"{age // 3600:.0f} h ago"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


class RunPicker(Screen):
    """The runs under a folder; Enter opens the highlighted one."""

    BINDINGS = [
        Binding("enter", "open", "Open", show=True),
        Binding("n", "new_run", "New run"),
        Binding("r", "rescan", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    class Scanned(Message):
        def __init__(self, runs: list[RunInfo]) -> None:
            super().__init__()
            self.runs = runs

        def can_replace(self, message: Message) -> bool:
            return isinstance(message, RunPicker.Scanned)

    def __init__(self, folder: str | os.PathLike, *, scanner: RunScan | None = None,
                 runs: list[RunInfo] | None = None) -> None:
        """scanner and runs: a scan already made (the app's first look at the folder)."""
        super().__init__()
        self.folder = Path(folder)
        self.scanner = scanner or RunScan(folder)
        self.runs: list[RunInfo] | None = runs     # None: not read yet

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Static(f"[b]Runs in {escape(str(self.folder))}[/b]  [dim]reading…[/dim]",
                         id="picker-title")
            yield DataTable(id="picker-table", cursor_type="row", zebra_stripes=False)
            yield Static(id="picker-detail")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        if self.runs is None:
            self.rescan()
        else:
            self._fill(self.runs)
        self.set_interval(RESCAN_S, self.rescan)

    def action_rescan(self) -> None:
        self.rescan()

    def rescan(self) -> None:
        """Read the folder again in a worker of the app's (whose one handler reports a
        failure); a scan still going is cancelled."""
        if self.is_current:
            self.app.run_worker(self._scan, name="runs", group="runs", thread=True,
                                exclusive=True, exit_on_error=False)

    def _scan(self) -> None:
        runs = self.scanner.scan()
        if not get_current_worker().is_cancelled:
            self.post_message(self.Scanned(runs))

    def on_run_picker_scanned(self, message: Scanned) -> None:
        self.runs = message.runs
        self.app.known_runs = message.runs
        self._fill(message.runs)

    def on_resize(self) -> None:
        if self.runs is not None:
            self._fill(self.runs)

    def _fill(self, runs: list[RunInfo]) -> None:
        table = self.query_one(DataTable)
        chosen = self.highlighted
        columns = self._columns(self.size.width - 2)
        table.clear(columns=True)
        for label, width in columns:
            table.add_column(label, width=width, key=label)
        now = time.time()
        for info in runs:
            cells = self._cells(info, now)
            table.add_row(*(cells[label] for label, _ in columns), key=str(info.path))
        if chosen is not None and str(chosen.path) in {str(r.path) for r in runs}:
            table.move_cursor(row=table.get_row_index(str(chosen.path)), animate=False)
        count = f"{len(runs)} run{'s' if len(runs) != 1 else ''}" if runs else "no runs yet"
        self.query_one("#picker-title", Static).update(
            f"[b]Runs in {escape(str(self.folder))}[/b]  [dim]{count} · enter opens · "
            f"n starts a new run[/dim]")
        self._show_detail()

    def _columns(self, width: int) -> list[tuple[str, int]]:
        """(label, width) of the columns that fit `width`: the model (often the run's name
        too) and the backend only where there is room (the line under the list has them);
        the run's name takes what is left, cut short with an ellipsis."""
        longest = max((len(self._cells(r, time.time())["state"]) for r in self.runs or ()),
                      default=8)
        fixed = [("samples", 7), ("state", max(longest, 8)), ("updated", 16)]
        optional = [("backend", 7), ("model", 22)]
        pad = 2                       # DataTable's cell padding, one each side
        shown = list(fixed)
        for column in optional:
            used = sum(w + pad for _, w in shown) + column[1] + pad
            if width - used >= 24 + pad:
                shown.insert(0, column)
        run_width = max(8, width - sum(w + pad for _, w in shown) - pad)
        order = ["run", "model", "backend", "samples", "state", "updated"]
        return sorted([("run", run_width), *shown], key=lambda c: order.index(c[0]))

    @staticmethod
    def _cells(info: RunInfo, now: float) -> dict:
        c = info.config
        state = info.state + (f" pid {info.pid}" if info.pid else "")
        return {"run": Text(info.name, overflow="ellipsis", no_wrap=True),
                "model": Text(c.model_name or c.model if c else "?", overflow="ellipsis",
                              no_wrap=True),
                "backend": c.backend if c else "?",
                "samples": Text(f"{info.done}/{c.samples}" if c else "-", justify="right"),
                "state": Text(state, style=STATE_STYLES.get(info.state, "")),
                "updated": fmt_updated(info.updated, now)}

    @property
    def highlighted(self) -> RunInfo | None:
        table = self.query_one(DataTable)
        if not self.runs or table.row_count == 0:
            return None
        row = table.cursor_row
        return self.runs[row] if 0 <= row < len(self.runs) else None

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        detail = self.query_one("#picker-detail", Static)
        info = self.highlighted
        if info is None:
            detail.update("" if self.runs is None else
                          f"No runs in {escape(str(self.folder))} yet: n starts one.")
            return
        if info.problem:
            detail.update(f"[$error]damaged:[/] {escape(info.problem)}")
            return
        c = info.config
        detail.update(escape(
            f"{info.path} · {c.model_name or c.model} · {c.backend} · {c.device} · {c.dtype} · "
            f"calibration {c.windows} × "
            f"{c.window_tokens} tokens of {c.calib_text} · seed {c.seed}"
            + (" · antithetic" if c.antithetic else "")))

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        info = self.highlighted
        if info is None:
            return
        if info.problem:
            self.app.show_error("Cannot open the run", info.problem)
            return
        try:
            self.app.open_run(str(info.path))
        except UserError as exc:
            self.app.show_error("Cannot open the run", str(exc))

    def action_new_run(self) -> None:
        self.app.new_run_form()

    async def action_quit(self) -> None:
        await self.app.action_quit()
