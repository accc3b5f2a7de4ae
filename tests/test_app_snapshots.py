"""How each screen looks, at 80x24 and 120x40 (pytest-textual-snapshot; Textual is pinned
so the SVGs do not drift). The dashboard shows tests/fixtures/run-tiny8, a real SPQE run
frozen on disk, so the numbers are the same on every machine; the cursor does not
blink and solver timings are hidden, the only things that would vary.

Update after an intended change with `pytest tests/test_app_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from impq_tui.app import ImpqApp
from impq_tui.screens.dashboard import Dashboard
from impq_tui.screens.setup import SetupDefaults

ROOT = Path(__file__).resolve().parent.parent
FROZEN = "tests/fixtures/run-tiny8"     # relative, so the path on screen is the same everywhere
SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


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


@pytest.mark.parametrize("size", SIZES)
def test_setup(snap_compare, size):
    app = ImpqApp(setup=SetupDefaults(device="cpu"), cursor_blink=False)
    assert snap_compare(app, terminal_size=size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("view", ["1", "2", "3", "4", "6"], ids=["estimates", "bits",
                                                                 "interactions", "frontier", "log"])
def test_dashboard_views(snap_compare, size, view):
    assert snap_compare(frozen_app(), terminal_size=size, run_before=settle(view))


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
def test_error_opening_a_folder_that_is_no_run(snap_compare, size):
    app = ImpqApp("tests/fixtures/no-such-run", cursor_blink=False)
    assert snap_compare(app, terminal_size=size)
