"""The run picker: `impq-tui` lists the runs under ./runs (or --runs DIR) with their state
read from the real run files, opens one with Enter, and keeps the form one key away."""
from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import time

import pytest
from run_factory import FROZEN, copy_frozen

from impq_tui.app import ImpqApp
from impq_tui.cli import build_parser
from impq_tui.screens.dashboard import Dashboard
from impq_tui.screens.picker import RunPicker, RunScan, fmt_updated
from impq_tui.screens.setup import SetupScreen

DEAD_PID = 2**22 + 1      # above Linux's largest pid: no process has it


def pilot_test(test):
    """Run an async Pilot test on a fresh event loop (no asyncio plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


async def until(pilot, condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


def cells(picker: RunPicker) -> dict[str, list[str]]:
    """Each row of the picker's table as plain text, by run name."""
    from textual.widgets import DataTable

    table = picker.query_one(DataTable)
    rows = {}
    for i in range(table.row_count):
        row = [str(getattr(c, "plain", c)) for c in table.get_row_at(i)]
        rows[row[0]] = row
    return rows


@pytest.fixture
def sleeper():
    process = subprocess.Popen(["sleep", "120"])
    yield process
    process.kill()
    process.wait()


@pilot_test
async def test_lists_runs_with_their_states_and_opens_one(tmp_path, sleeper):
    runs = tmp_path / "runs"
    copy_frozen(runs / "finished")
    copy_frozen(runs / "died", samples=5, status={
        "state": "running", "pid": DEAD_PID, "time": 0.0, "message": "", "progress": None})
    copy_frozen(runs / "going", samples=7, status={
        "state": "running", "pid": sleeper.pid, "time": time.time(), "message": "",
        "progress": None})
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text("[1, 2]")      # JSON, but no run config
    (runs / "empty-folder").mkdir()                              # no run: not listed
    app = ImpqApp(runs=str(runs), cursor_blink=False)
    async with app.run_test(size=(120, 30)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunPicker) and app.screen.runs is not None
                    and app.screen.query_one("DataTable").row_count == 4, "the picker's rows")
        picker = app.screen
        rows = cells(picker)
        assert set(rows) == {"finished", "died", "going", "broken"}
        assert rows["finished"][3:5] == ["12/12", "finished"]
        assert rows["died"][3:5] == ["5/12", "interrupted"]
        assert rows["going"][3:5] == ["7/12", f"running pid {sleeper.pid}"]
        assert rows["broken"][4] == "damaged"
        assert rows["finished"][1:3] == ["impq-tui-tiny8", "quanto"]
        # a damaged run says why, and Enter on it is a message, not a crash
        picker.query_one("DataTable").move_cursor(row=list(rows).index("broken"))
        await until(pilot, lambda: "holds no settings" in str(
            picker.query_one("#picker-detail").render()), "the reason it is damaged")
        await pilot.press("enter")
        await until(pilot, lambda: type(app.screen).__name__ == "ErrorModal", "the message")
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is picker, "the list again")
        # Enter opens a run: the same dashboard as `impq-tui --run DIR`
        picker.query_one("DataTable").move_cursor(row=list(rows).index("finished"))
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, Dashboard) and app.screen.is_current
                    and app.screen.allocation is not None, "the dashboard")
        assert app.screen.run.path == runs / "finished" and len(app.screen.D) == 12
        # the palette's "Open run…" goes back to the list
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Open run…" in titles
        app.show_runs()
        await until(pilot, lambda: app.screen is picker, "the list again")


@pilot_test
async def test_no_runs_means_the_form(tmp_path):
    app = ImpqApp(runs=str(tmp_path / "runs"), cursor_blink=False)     # no such folder
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, SetupScreen) and app.screen.query("#model"),
                    "the form")
        import torch

        # sized for the device: minutes on a CPU, not hours
        assert app.screen.value("samples") == ("100" if torch.cuda.is_available() else "10")


@pilot_test
async def test_the_form_is_one_key_away(tmp_path):
    copy_frozen(tmp_path / "runs" / "finished")
    app = ImpqApp(runs=str(tmp_path / "runs"), cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, RunPicker), "the picker")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, SetupScreen), "the form")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert "Start run" in titles and "Open run…" in titles
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, RunPicker), "the list again")
        # F6 on the form with no folder typed shows the list too
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, SetupScreen), "the form")
        await pilot.press("f6")
        await until(pilot, lambda: isinstance(app.screen, RunPicker), "the list again")


def test_a_scan_rereads_only_what_changed(tmp_path):
    run = copy_frozen(tmp_path / "runs" / "a", samples=3)
    scan = RunScan(tmp_path / "runs")
    first = scan.scan()[0]
    assert first.done == 3 and scan.scan()[0] is first          # nothing changed: not re-read
    full = (FROZEN / "samples.jsonl").read_text()
    (run / "samples.jsonl").write_text(full)
    again = scan.scan()[0]
    assert again is not first and again.done == 12
    assert list(again.sample_seconds) == [json.loads(line)["seconds"] for line in full.splitlines()]


def test_updated_reads_as_age_then_date(monkeypatch):
    now = 1_735_732_800.0
    assert fmt_updated(now - 42, now) == "42 s ago"
    assert fmt_updated(now - 600, now) == "10 min ago"
    assert fmt_updated(now - 3 * 3600, now) == "3 h ago"
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert fmt_updated(now - 2 * 86400, now) == "2024-12-30 12:00"
    finally:
        monkeypatch.undo()
        time.tzset()
    assert fmt_updated(None) == "-"


def test_cli_takes_the_runs_folder():
    assert build_parser().parse_args([]).runs == "runs"
    args = build_parser().parse_args(["--runs", "elsewhere"])
    assert args.runs == "elsewhere" and args.run is None
