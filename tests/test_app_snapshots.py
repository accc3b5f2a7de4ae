"""How each screen looks, at 60x20, 80x24 and 120x40 (pytest-textual-snapshot; Textual is
pinned so the SVGs do not drift). The dashboard shows tests/fixtures/run-tiny8, a real SPQE
run frozen on disk, or a synthetic run of 30 or 80 layers (tests/run_factory.py), so the
numbers are the same on every machine; the cursor does not blink, solver timings are
hidden, the form's duration probe answers a fixed rate, files carry one fixed mtime and
dates print in UTC: nothing that would vary is drawn.

Update after an intended change with `pytest tests/test_app_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from impq_tui import estimate
from impq_tui.app import ImpqApp
from impq_tui.screens.dashboard import Dashboard
from impq_tui.screens.picker import RunPicker
from impq_tui.screens.setup import SetupDefaults, SetupScreen
from run_factory import copy_frozen, freeze, synthetic_run

ROOT = Path(__file__).resolve().parent.parent
FROZEN = "tests/fixtures/run-tiny8"     # relative, so the path on screen is the same everywhere
SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
SMALL = [pytest.param((60, 20), id="60x20"), pytest.param((80, 24), id="80x24")]
DEAD_PID = 2**22 + 1      # above Linux's largest pid: no process has it


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def frozen_app(**kwargs) -> ImpqApp:
    return ImpqApp(FROZEN, cursor_blink=False, timings=False, **kwargs)


def settle(*keys: str):
    """run_before: wait for the dashboard to show the frozen run, press keys, wait again."""
    async def run_before(pilot) -> None:
        app = pilot.app
        deadline = time.monotonic() + 120

        async def wait() -> None:
            await pilot.pause()
            while not (isinstance(app.screen, Dashboard) and app.screen.is_current
                       and app.screen.frontier is not None
                       and not any(w.is_running for w in app.workers if w.group != "follow")):
                if app.dashboard is not None and app.screen is not app.dashboard:
                    break       # a modal is up: nothing more will change underneath
                assert time.monotonic() < deadline, "the dashboard never settled"
                await pilot.pause(0.05)
            await pilot.pause()

        await wait()
        for key in keys:
            await pilot.press(key)
            await wait()

    return run_before


@pytest.fixture
def fixed_probe(monkeypatch):
    """The form's duration probe answers one rate: 250 ms a layer, 600 ms the head."""
    monkeypatch.setattr(estimate, "probe", lambda *args: (0.25, 0.6))
    monkeypatch.setattr(SetupScreen, "measured", {})


async def estimated(pilot) -> None:
    """run_before: wait for the form's duration estimate (the form may be under a modal)."""
    deadline = time.monotonic() + 60
    while not any(isinstance(s, SetupScreen) and s.estimate for s in pilot.app.screen_stack):
        assert time.monotonic() < deadline, "the form never showed its estimate"
        await pilot.pause(0.05)
    await pilot.pause()


@pytest.mark.parametrize("size", [*SIZES, pytest.param((60, 20), id="60x20")])
def test_setup(snap_compare, fixed_probe, size):
    """The defaults for a CPU (10 samples, said so) and the probed duration."""
    app = ImpqApp(setup=SetupDefaults(device="cpu"), cursor_blink=False)
    assert snap_compare(app, terminal_size=size, run_before=estimated)


@pytest.mark.parametrize("size", [*SIZES, pytest.param((60, 20), id="60x20")])
@pytest.mark.parametrize("view", ["1", "2", "3", "4", "6"], ids=["estimates", "bits",
                                                                 "interactions", "frontier", "log"])
def test_dashboard_views(snap_compare, size, view):
    assert snap_compare(frozen_app(), terminal_size=size, run_before=settle(view))


@pytest.fixture
def runs_here(tmp_path, monkeypatch):
    """A folder holding runs/ to fill, as the current directory, dates in UTC."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield tmp_path / "runs"
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", SMALL)
@pytest.mark.parametrize("layers", [30, 80])
@pytest.mark.parametrize("view", ["2", "3"], ids=["bits", "interactions"])
def test_deep_model_on_a_small_terminal(snap_compare, runs_here, size, layers, view):
    """30 and 80 layers: the budget strip says each layer's bits as a digit, the K grid
    shrinks to fit beside the strongest pairs (two rows a line, then blocks of layers)."""
    synthetic_run(runs_here / f"synthetic-{layers}", layers, samples=12)
    app = ImpqApp(f"runs/synthetic-{layers}", cursor_blink=False, timings=False)
    assert snap_compare(app, terminal_size=size, run_before=settle(view))


def picker_runs(runs: Path) -> None:
    """A finished run, one whose writer died after 5 of 12 samples, one with a broken
    config.json and one with a damaged samples line, and a folder that is no run."""
    copy_frozen(runs / "tiny8-finished")
    copy_frozen(runs / "tiny8-interrupted", samples=5,
                status={"state": "running", "pid": DEAD_PID, "time": 0.0, "message": "",
                        "progress": None})
    (runs / "broken").mkdir()
    (runs / "broken" / "config.json").write_text("{not json")
    torn = copy_frozen(runs / "tiny8-torn")
    lines = (torn / "samples.jsonl").read_text().splitlines(keepends=True)
    (torn / "samples.jsonl").write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    (runs / "notes").mkdir()
    (runs / "notes" / "todo.txt").write_text("not a run")
    for folder in runs.iterdir():
        freeze(folder)


async def picked(pilot) -> None:
    deadline = time.monotonic() + 60
    while not (isinstance(pilot.app.screen, RunPicker) and pilot.app.screen.runs is not None):
        assert time.monotonic() < deadline, "the picker never listed the runs"
        await pilot.pause(0.05)
    await pilot.pause()


@pytest.mark.parametrize("size", SMALL)
def test_run_picker(snap_compare, runs_here, size):
    picker_runs(runs_here)
    assert snap_compare(ImpqApp(runs="runs", cursor_blink=False), terminal_size=size,
                        run_before=picked)


def test_run_picker_damaged_run_highlighted(snap_compare, runs_here):
    """The reason a damaged run cannot be opened, under the list."""
    picker_runs(runs_here)

    async def run_before(pilot) -> None:
        await picked(pilot)
        await pilot.press("down", "down")
        await pilot.pause()

    assert snap_compare(ImpqApp(runs="runs", cursor_blink=False), terminal_size=(80, 24),
                        run_before=run_before)


def test_dashboard_after_budget_keys(snap_compare):
    """2.50 bits, reached by keys, on the bit map: fewer layers at 4 bits, the map follows."""
    assert snap_compare(frozen_app(), terminal_size=(80, 24),
                        run_before=settle("2", "left_square_bracket", "left_square_bracket"))


@pytest.mark.parametrize("size", SIZES)
def test_dashboard_compare(snap_compare, size):
    """The fixture's saved comparison (a real `impq-tui compare`, timings frozen)."""
    assert snap_compare(frozen_app(), terminal_size=size, run_before=settle("5"))


@pytest.mark.parametrize("size", SIZES)
def test_help(snap_compare, size):
    assert snap_compare(frozen_app(), terminal_size=size, run_before=settle("f1"))


@pytest.mark.parametrize("size", SIZES)
def test_export(snap_compare, size):
    assert snap_compare(frozen_app(), terminal_size=size, run_before=settle("e"))


@pytest.mark.parametrize("size", SIZES)
def test_error_opening_a_folder_that_is_no_run(snap_compare, fixed_probe, size):
    app = ImpqApp("tests/fixtures/no-such-run", cursor_blink=False)
    assert snap_compare(app, terminal_size=size, run_before=estimated)
