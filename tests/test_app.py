"""The Textual app driven by a Pilot over real SPQE runs on a tiny real checkpoint: start a
run from the form (a process of its own), watch the panes fill, move the budget and
compare with what `impq-tui solve` computes, pause, stop, reopen, follow a run another
process writes, quit leaving a run going or stopping it, and see errors as messages
rather than tracebacks."""
from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import TabbedContent

from core.evaluate import allocate
from core.runs import RunDir
from impq_tui.app import ImpqApp
from impq_tui.report import fmt_bytes
from impq_tui.screens.dashboard import Dashboard
from impq_tui.screens.modals import ErrorModal, HelpScreen, LeaveRunModal
from impq_tui.screens.setup import SetupDefaults, SetupScreen
from impq_tui.widgets.compare import CompareView
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.panes import BudgetPane, BudgetSlider, ProgressPane

ROOT = Path(__file__).resolve().parent.parent
SIZE = (100, 30)
PATIENCE_S = 240      # a guard against hanging forever, not a timing assertion


def pilot_test(test):
    """Run an async Pilot test on a fresh event loop (no asyncio plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


def tiny_setup(model, run_dir, samples: int, windows: int = 4, window_tokens: int = 32) -> SetupDefaults:
    return SetupDefaults(model=str(model), samples=samples, windows=windows,
                         window_tokens=window_tokens, device="cpu", run_dir=str(run_dir))


def slow_setup(model, run_dir, samples: int) -> SetupDefaults:
    """Samples of a few tenths of a second each: a run that is still going when looked at
    (never stopped early because its decision settled)."""
    return replace(tiny_setup(model, run_dir, samples, windows=8, window_tokens=128),
                   until_settled=False)


def status_of(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


@pytest.fixture(autouse=True)
def _no_run_left_behind(tmp_path):
    """A run process a test started and did not see end (a test that failed half-way,
    one that left it running on purpose) is stopped."""
    yield
    for lock in tmp_path.rglob("run.lock"):
        try:
            pid = int(lock.read_text().split()[1])
            if b"impq_tui" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass


def wait_for_writer_to_end(run_dir, patience: float = PATIENCE_S) -> str:
    """Wait (off any event loop) until the run's process is gone; its final state."""
    from impq_tui.follow import read_snapshot

    deadline = time.monotonic() + patience
    while (snap := read_snapshot(RunDir.open(run_dir))).writer.alive:
        assert time.monotonic() < deadline, "the run's process never ended"
        time.sleep(0.1)
    return snap.state


async def until(pilot, condition, what: str) -> None:
    """Let the app run until `condition()` holds; an error shown meanwhile fails at once
    (unless the error is what we wait for)."""
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        screen = pilot.app.screen
        if isinstance(screen, ErrorModal):
            raise AssertionError(f"waiting for {what}, the app showed: {screen.title_text}: "
                                 f"{screen.message}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await pilot.pause(0.05)


async def settled(pilot) -> None:
    """Wait until the dashboard shows the current samples and budget, and the solver and
    workers (not the one that follows the run folder) are done."""
    app = pilot.app

    def idle() -> bool:
        dash = app.dashboard
        return ((dash is None or dash.is_current)
                and not any(w.is_running for w in app.workers if w.group != "follow"))

    await pilot.pause()
    await until(pilot, idle, "solver workers")
    await pilot.pause()


def text_of(widget) -> str:
    """What the widget shows on screen, as plain text, wrapped lines joined by spaces."""
    lines = widget.render_lines(widget.region.reset_offset)
    return " ".join(" ".join(line.text.split()) for line in lines).strip()


def pane_text(app, selector: str) -> str:
    return " ".join(text_of(w) for w in app.screen.query_one(selector).query("Static"))


def check_matches_solve(dash: Dashboard) -> None:
    """The screen shows what `impq-tui solve DIR --bits B` computes from the saved run."""
    expected = allocate(dash.run, bits=dash.bits)
    shown = dash.allocation
    assert shown.bits_per_layer == expected.bits_per_layer
    assert shown.bytes == expected.bytes and shown.budget_bytes == expected.budget_bytes
    assert shown.predicted_delta_nll == pytest.approx(expected.predicted_delta_nll, rel=1e-9, abs=1e-12)
    assert dash.query_one("#layer-map", LayerMap).bits == expected.bits_per_layer
    assert dash.query_one("#budget-strip", LayerMap).bits == expected.bits_per_layer
    budget = pane_text(dash.app, BudgetPane)
    assert fmt_bytes(expected.bytes) in budget
    assert f"{dash.bits:.2f}" in budget
    high = sum(b == 4 for b in expected.bits_per_layer)
    assert f"{high}/{len(expected.bits_per_layer)} at 4 bits" in budget


@pilot_test
async def test_live_run_budget_stop_and_reopen(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "live"
    app = ImpqApp(setup=slow_setup(tiny_model_dir, run_dir, samples=500), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, SetupScreen)
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        assert (run_dir / "config.json").is_file()
        await until(pilot, lambda: len(dash.D) >= 3 and dash.fit is not None
                    and dash.fit.samples >= 3, "three samples on screen")

        # SPQE runs in a process of its own session, which the screen follows
        writer = dash.writer
        assert dash.state == "running" and writer.pid != os.getpid()
        assert os.getsid(writer.pid) == writer.pid != os.getsid(0)
        progress = pane_text(app, ProgressPane)
        assert "sample" in progress and "/500" in progress and "eval/s" in progress
        assert "cpu" in progress and f"pid {writer.pid}" in progress
        assert dash.fit.model.phi.shape == (4,) and np.all(dash.fit.model.se > 0)
        assert len(dash.query_one("#layer-map", LayerMap).bits) == 4

        # pause: the process waits between evaluations; resume lets it go on
        await pilot.press("p")
        assert dash.state == "paused"
        await until(pilot, lambda: dash.snapshot.paused, "the process to pause")
        assert "paused" in pane_text(app, ProgressPane)
        held = len(RunDir.open(run_dir).samples())
        await pilot.pause(1.5)
        assert len(RunDir.open(run_dir).samples()) <= held + 1   # the sample in flight at most
        await pilot.press("p")
        await until(pilot, lambda: not dash.snapshot.paused and dash.state == "running",
                    "the process to go on")
        await until(pilot, lambda: len(dash.D) > held + 1, "more samples")

        # stop: SIGTERM; the process ends cleanly and everything finished is on disk
        await pilot.press("s")
        assert dash.state == "stopping"
        await until(pilot, lambda: dash.writer is None, "the process to stop")
        await settled(pilot)
        assert dash.state == "cancelled"
        saved = RunDir.open(run_dir)
        assert 3 <= len(saved.samples()) < 500
        np.testing.assert_array_equal(dash.D, saved.D())
        assert status_of(run_dir)["state"] == "cancelled"

        # budget keys re-solve; the map and numbers equal `impq-tui solve`
        check_matches_solve(dash)
        seen = {dash.allocation.bits_per_layer}
        for key, bits in (("left_square_bracket", 2.75), ("left_square_bracket", 2.5),
                          ("left", 2.45), ("right_square_bracket", 2.7),
                          ("right_square_bracket", 2.95), ("right_square_bracket", 3.2),
                          ("right_square_bracket", 3.45), ("right_square_bracket", 3.7)):
            await pilot.press(key)
            assert dash.bits == bits
            await settled(pilot)
            check_matches_solve(dash)
            seen.add(dash.allocation.bits_per_layer)
        assert len(seen) > 1, "moving the budget from 2.45 to 3.7 never changed the allocation"
        for _ in range(6):
            await pilot.press("right_square_bracket")
        assert dash.bits == 4.0
        await settled(pilot)
        assert dash.allocation.bits_per_layer == (4, 4, 4, 4)
        budget_at_4 = dash.allocation
        assert budget_at_4.status == "all-high"

    # reopen the stopped run: same samples, same allocation, nothing recomputed
    app = ImpqApp(str(run_dir), bits=2.5)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await until(pilot, lambda: dash.allocation is not None, "the allocation")
        await settled(pilot)
        assert dash.state == "cancelled" and dash.writer is None
        np.testing.assert_array_equal(dash.D, RunDir.open(run_dir).D())
        check_matches_solve(dash)


@pilot_test
async def test_mouse_moves_the_budget(tmp_path):
    app = ImpqApp(str(ROOT / "tests/fixtures/run-tiny8"), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await until(pilot, lambda: dash.allocation is not None, "the allocation")
        slider = dash.query_one(BudgetSlider)
        width = slider.size.width
        await pilot.click(BudgetSlider, offset=(1, 0))
        assert dash.bits == 2.0
        await pilot.click(BudgetSlider, offset=(width - 2, 0))
        assert dash.bits == 4.0
        await pilot.click(BudgetSlider, offset=(width // 2, 0))
        assert 2.9 <= dash.bits <= 3.1
        middle = dash.bits
        await settled(pilot)
        check_matches_solve(dash)
        # typed exactly: b opens a prompt
        await pilot.press("b")
        app.screen.query_one("Input").value = "2.35"
        await pilot.press("enter")
        assert dash.bits == 2.35 and middle != 2.35
        await settled(pilot)
        check_matches_solve(dash)
        # a value out of range is refused with a message, the prompt stays
        await pilot.press("b")
        app.screen.query_one("Input").value = "4.5"
        await pilot.press("enter")
        assert app.screen is not dash and "2.0 to 4.0" in text_of(app.screen.query_one("#number-message"))
        await pilot.press("escape")
        assert app.screen is dash and dash.bits == 2.35


@pilot_test
async def test_bad_model_path_is_a_message(tmp_path):
    run_dir = tmp_path / "bad"
    setup = tiny_setup(tmp_path / "no-such-model", run_dir, samples=3)
    app = ImpqApp(setup=setup, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        form = app.screen
        await pilot.press("f5")
        # refused on the form, before a run folder or a process exists (core.runs resolves
        # the model path when the run is created)
        assert isinstance(app.screen, SetupScreen)
        message = text_of(form.query_one("#setup-message"))
        assert "does not exist" in message and "no-such-model" in message.replace(" ", "")
        assert "Traceback" not in message and "--model" not in message
        assert not run_dir.exists()


@pilot_test
async def test_form_refuses_bad_numbers_and_existing_runs(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    app = ImpqApp(setup=tiny_setup("embedded", taken, samples=5), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        form = app.screen
        form.query_one("#samples").value = "0"
        await pilot.press("f5")
        assert isinstance(app.screen, SetupScreen)
        assert "Samples M must be at least 1" in text_of(form.query_one("#setup-message"))
        # letters are refused with a message naming the form's field, not dropped
        form.query_one("#samples").value = "1e99"
        await pilot.press("f5")
        message = text_of(form.query_one("#setup-message"))
        assert "Samples M '1e99' is not a whole number" in message and "--" not in message
        form.query_one("#window_tokens").value = "1"
        form.query_one("#samples").value = "5"
        await pilot.press("f5")
        message = text_of(form.query_one("#setup-message"))
        assert "Tokens per window must be at least 2" in message and "--" not in message
        form.query_one("#window_tokens").value = "32"
        await pilot.press("f5")
        assert isinstance(app.screen, SetupScreen)
        assert "already exists and is not empty" in text_of(form.query_one("#setup-message"))
        # F6 opens a saved run instead
        form.query_one("#run_dir").value = str(ROOT / "tests/fixtures/run-tiny8")
        await pilot.press("f6")
        assert isinstance(app.screen, Dashboard)
        # and a folder that is no run is explained
        await pilot.press("n")
        assert isinstance(app.screen, SetupScreen)
        app.screen.query_one("#run_dir").value = str(tmp_path)
        await pilot.press("f6")
        assert "not an impq-tui run directory" in text_of(app.screen.query_one("#setup-message"))


@pilot_test
async def test_stop_when_settled_is_the_forms_default_and_continue_keeps_it(tiny_model_dir, tmp_path):
    """A new run from the form stops once its allocations settle (core.settle): the choice
    reaches config.json, the progress pane says where it stopped, and Continue keeps it."""
    from core.settle import DEFAULT_BITS, SettleRule

    run_dir, most = tmp_path / "settles", 150
    app = ImpqApp(setup=tiny_setup(tiny_model_dir, run_dir, samples=most, windows=2),
                  cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        form = app.screen
        assert form.query_one("#until_settled").value is True
        assert form.value("settle_bits") == "2.5 3 3.5"
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        saved = json.loads((run_dir / "config.json").read_text())
        assert saved["until_settled"] == list(DEFAULT_BITS) and saved["samples"] == most
        await until(pilot, lambda: dash.state == "completed" and dash.writer is None,
                    "the run to settle")
        await settled(pilot)
        m = len(RunDir.open(run_dir).samples())
        assert SettleRule.min_samples <= m < most
        progress = pane_text(app, ProgressPane)
        assert f"settled at sample {m} of {most}" in progress, progress
        assert "completed" in progress

        # Continue runs `run --resume` with the run's own choice: it stops again once
        # settled, at least K new samples on
        await pilot.press("r")
        await pilot.press("enter")                 # the proposed count: the run's maximum
        await until(pilot, lambda: dash.state == "completed" and dash.writer is None
                    and len(dash.D) > m, "the continued run to settle")
        await settled(pilot)
        m2 = len(RunDir.open(run_dir).samples())
        assert m + SettleRule.K <= m2 <= most
        assert RunDir.open(run_dir).config.until_settled == DEFAULT_BITS
        if m2 < most:
            assert f"settled at sample {m2} of {most}" in pane_text(app, ProgressPane)


@pilot_test
async def test_stop_when_settled_off_runs_every_sample(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "all"
    app = ImpqApp(setup=tiny_setup(tiny_model_dir, run_dir, samples=3, windows=2),
                  cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        form = app.screen
        await pilot.click("#until_settled")
        assert form.query_one("#until_settled").value is False
        assert form.query_one("#settle_bits").disabled
        assert form.config().until_settled == ()
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        assert json.loads((run_dir / "config.json").read_text())["until_settled"] == []
        dash = app.screen
        await until(pilot, lambda: dash.state == "completed" and dash.writer is None, "the run")
        await settled(pilot)
        assert len(RunDir.open(run_dir).samples()) == 3
        assert "settled at" not in pane_text(app, ProgressPane)


@pilot_test
async def test_the_budgets_to_settle_are_checked_against_the_levels(tmp_path):
    """Budgets outside the chosen levels, words and an empty field are refused on the form,
    in its words, before a run folder exists; the default follows the levels."""
    run_dir = tmp_path / "never"
    app = ImpqApp(setup=tiny_setup("embedded", run_dir, samples=50), cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        form = app.screen
        budgets = form.query_one("#settle_bits")

        async def refused(value: str) -> str:
            budgets.value = value
            await pilot.press("f5")
            await pilot.pause()
            assert isinstance(app.screen, SetupScreen) and not run_dir.exists()
            message = form.query_one("#setup-message")
            # in view on a small terminal, above the footer, whatever the form's scroll
            await until(pilot, lambda: message.region.height > 0
                        and message.region.y + message.region.height <= 23,
                        f"the message in view ({message.region})")
            footer = app.screen.query_one("Footer").region
            assert message.region.y + message.region.height <= footer.y, (message.region, footer)
            return text_of(message)

        message = await refused("3 5")
        assert message == ("Stop when settled 5 is outside the chosen Levels (2 to 4 bits): "
                           "choose budgets between them."), message
        assert "Stop when settled 'three' is not a number of bits" in await refused("2.5 three")
        assert "Stop when settled has no budget" in await refused("  ")
        assert "Stop when settled nan is outside" in await refused("nan")
        # commas and spaces both separate; repeats are one budget
        budgets.value = "3.5, 2.5 3.5"
        assert form.config().until_settled == (2.5, 3.5)
        # the default follows the levels: 4 and 8 bits watch their middle...
        budgets.value = "2.5 3 3.5"
        form.query_one("#backend").value = "hqq"
        await pilot.pause()
        form.query_one("#levels").value = "4 8"
        await pilot.pause()
        assert form.value("settle_bits") == "6" and form.config().until_settled == (6.0,)
        # ...but budgets the user typed are kept, and checked against the new levels
        budgets.value = "3"
        form.query_one("#levels").value = "2 3 4 8"
        await pilot.pause()
        form.query_one("#levels").value = "4 8"
        await pilot.pause()
        assert form.value("settle_bits") == "3"
        assert "Stop when settled 3 is outside the chosen Levels (4 to 8 bits)" in await refused("3")


@pilot_test
async def test_opening_a_missing_run_shows_why(tmp_path):
    app = ImpqApp(str(tmp_path / "nothing-here"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, ErrorModal)
        assert "not an impq-tui run directory" in text_of(app.screen.query_one("#error-message"))
        await pilot.press("escape")
        assert isinstance(app.screen, SetupScreen)


@pilot_test
async def test_follows_a_run_another_process_writes(tiny_model_dir, tmp_path):
    run_dir, samples = tmp_path / "headless", 40     # a few seconds: long enough to see it run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir), "--samples", str(samples),
         "--windows", "8", "--window-tokens", "128", "--device", "cpu", "--quiet",
         "--run-dir", str(run_dir)], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + PATIENCE_S
        while not (run_dir / "config.json").is_file():
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        app = ImpqApp(str(run_dir), cursor_blink=False)
        states = set()
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
            dash = app.screen

            def done() -> bool:
                states.add(dash.state)
                return dash.state == "completed" and len(dash.D) == samples

            await until(pilot, done, "the writer to finish")
            await settled(pilot)
            assert "running" in states
            assert dash.source.process is None      # the app started nothing
            np.testing.assert_array_equal(dash.D, RunDir.open(run_dir).D())
            check_matches_solve(dash)
            assert "completed" in pane_text(app, ProgressPane)
    finally:
        writer.wait(timeout=PATIENCE_S)
    assert writer.returncode == 0


@pilot_test
async def test_a_run_whose_process_died_shows_as_interrupted(tmp_path):
    """status.json still says running, but the pid in it (and in run.lock) is gone: the
    writer was killed. The screen says interrupted and offers to continue. The pid here
    is a zombie (ended, not reaped), as a killed run is where init never reaps."""
    import shutil

    run_dir = tmp_path / "killed"
    shutil.copytree(ROOT / "tests/fixtures/run-tiny8", run_dir)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{dead.pid}/stat")
    while stat.read_text().rpartition(")")[2].split()[0] != "Z":
        time.sleep(0.01)
    status = {**status_of(run_dir), "state": "running", "pid": dead.pid, "time": time.time()}
    (run_dir / "status.json").write_text(json.dumps(status))
    (run_dir / "run.lock").write_text(f"pid {dead.pid} on {os.uname().nodename}")
    app = ImpqApp(str(run_dir), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        assert dash.state == "interrupted" and dash.writer is None
        assert "interrupted" in pane_text(app, ProgressPane)
        assert f"pid {dead.pid}" not in pane_text(app, ProgressPane)
        assert dash.check_action("continue_run", ()) and not dash.check_action("stop", ())
        await pilot.press("q")                    # nothing runs: no question
        await until(pilot, lambda: app.return_code is not None, "the app to exit")
    dead.wait()


@pilot_test
async def test_quit_asks_whether_to_leave_the_run_going(tiny_model_dir, tmp_path):
    """q while a run goes asks once: "leave it running" ends the app and not the run,
    which the next app shows live and can stop; "stop it" ends both."""
    run_dir = tmp_path / "quit"
    app = ImpqApp(setup=slow_setup(tiny_model_dir, run_dir, samples=500), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await until(pilot, lambda: len(dash.D) >= 1 and dash.state == "running", "a sample")
        pid = dash.writer.pid
        await pilot.press("q")
        assert isinstance(app.screen, LeaveRunModal)
        await pilot.press("escape")               # stay
        assert app.screen is dash and app.return_code is None
        await pilot.press("q")
        await pilot.press("l")
        await until(pilot, lambda: app.return_code is not None, "the app to exit")
    assert app.return_code == 0
    os.kill(pid, 0)                               # the run goes on without the app
    assert status_of(run_dir)["state"] == "running"

    app = ImpqApp(str(run_dir), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await until(pilot, lambda: dash.state == "running" and dash.writer is not None, "the run, live")
        assert dash.writer.pid == pid
        before = len(dash.D)
        await until(pilot, lambda: len(dash.D) > before, "a new sample")
        await pilot.press("q")
        await pilot.press("s")                    # stop it and quit
        await until(pilot, lambda: app.return_code is not None, "the app to exit")
    assert wait_for_writer_to_end(run_dir) == "cancelled"
    assert status_of(run_dir)["state"] == "cancelled"
    assert 1 <= len(RunDir.open(run_dir).samples()) < 500


@pilot_test
async def test_help_lists_the_keys_of_the_screen():
    app = ImpqApp(str(ROOT / "tests/fixtures/run-tiny8"), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        keys = text_of(app.screen.query_one("#help-keys"))
        for phrase in ("budget +0.05", "budget −0.25", "Export", "Continue", "type a budget", "Quit"):
            assert phrase in keys
        await pilot.press("escape")
        assert isinstance(app.screen, Dashboard)
        for view in ("bits", "interactions", "frontier", "compare", "log", "estimates"):
            await pilot.press(str(("estimates", "bits", "interactions", "frontier", "compare", "log").index(view) + 1))
            assert app.screen.query_one("#views").active == view
        await pilot.press("q")
        await until(pilot, lambda: app.return_code is not None, "the app to exit")
    assert app.return_code == 0


@pilot_test
async def test_export_and_evaluate_the_chosen_allocation(tiny_model_dir, tmp_path):
    export = pytest.importorskip("core.export")
    run_dir, out = tmp_path / "run", tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir),
                    "--samples", "3", "--windows", "4", "--window-tokens", "32", "--device", "cpu",
                    "--quiet", "--run-dir", str(run_dir)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    app = ImpqApp(str(run_dir), bits=2.5, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        chosen = dash.allocation
        await pilot.press("e")
        screen = app.screen
        assert screen.query_one("#export-backend").value == "quanto"
        assert "quanto" in export.EXPORT_BACKENDS
        screen.query_one("#export-out").value = str(out)

        def finished() -> bool:
            return not screen.busy and "exported to" in text_of(screen.query_one("#export-result"))

        await pilot.press("f5")
        await until(pilot, finished, "the export")
        record = json.loads((out / "allocation.json").read_text())
        assert record["bits_per_layer"] == list(chosen.bits_per_layer)
        assert str(out) in text_of(screen.query_one("#export-result"))

        # exporting into the same non-empty folder again is refused with a message
        await pilot.press("f5")
        await until(pilot, lambda: isinstance(app.screen, ErrorModal), "the refusal")
        await pilot.pause()
        assert "Traceback" not in text_of(app.screen.query_one("#error-message"))
        await pilot.press("escape")
        await until(pilot, lambda: not screen.busy, "the screen to be ready")

        # evaluate: perplexity of this allocation with real modules, saved in the run
        await pilot.press("f6")
        await until(pilot, lambda: not screen.busy and "perplexity" in text_of(
            screen.query_one("#export-result")), "the evaluation")
        saved = json.loads((run_dir / "evals" / "bits-2.50-quanto.json").read_text())
        assert saved["bits_per_layer"] == list(chosen.bits_per_layer)
        assert f"perplexity {saved['ppl']:.3f}" in text_of(screen.query_one("#export-result"))
        await pilot.press("escape")
        assert app.screen is dash


def test_frontier_and_stability_are_the_solvers():
    """The dashboard's frontier and its "unchanged for the last k samples" come from the
    same SCIP solves as `impq-tui solve`, cached: check them against core directly."""
    from core.evaluate import run_frontier
    from core.interactions import quadratic_model
    from core.solver import solve
    from impq_tui import analysis

    run = RunDir.open(ROOT / "tests/fixtures/run-tiny8")
    D, costs = run.D(), run.costs()
    allocations = analysis.Allocations(costs)
    points = analysis.frontier_points(D, allocations)
    expected = run_frontier(run)
    assert [p.bits for p in points] == [a.target_bits for a in expected]
    assert [p.predicted for p in points] == pytest.approx([a.predicted_delta_nll for a in expected])
    assert [p.high_layers for p in points] == [sum(b == 4 for b in a.bits_per_layer) for a in expected]

    for bits in (2.5, 3.0):
        qs = [solve(m.a, m.K, costs, bits=bits).q
              for m in (quadratic_model(D[:n]) for n in range(len(D) - 10, len(D) + 1))]
        k = 0
        while k < 10 and qs[-2 - k] == qs[-1]:
            k += 1
        assert analysis.unchanged_for(D, allocations, bits) == k
    # the fixture's allocation at 3 bits held for exactly the last 3 samples (as on screen)
    assert analysis.unchanged_for(D, allocations, 3.0) == 3


@pilot_test
async def test_compare_view_runs_and_shows_the_comparison(tiny_model_dir, tmp_path):
    """`c` on the Compare view evaluates IMPQ and the baselines at the preset budgets and
    the current one, saves them in the run, and shows the same numbers; reopening the run
    shows the saved table."""
    from core.results import LABELS, load_saved
    from impq_tui.report import format_ppl

    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir),
                    "--samples", "3", "--windows", "4", "--window-tokens", "32", "--device", "cpu",
                    "--quiet", "--run-dir", str(run_dir)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    app = ImpqApp(str(run_dir), bits=2.7, cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        await pilot.press("5")
        assert "Press c" in text_of(dash.query_one("#compare-status"))
        await pilot.press("2")                     # from another view, c brings the table forward
        await pilot.press("c")
        assert dash.query_one(TabbedContent).active == "compare"
        view = dash.query_one(CompareView)
        await until(pilot, lambda: view.result is not None or "failed" in text_of(
            dash.query_one("#compare-status")), "the comparison")
        status = text_of(dash.query_one("#compare-status"))
        assert "compared" in status, status
        result = load_saved(dash.run, "quanto")
        assert result.bits == (2.25, 2.5, 2.7, 3.0, 3.5)
        # the table is drawn by the message that follows the result: wait for it
        await until(pilot, lambda: "2.7 bits" in text_of(dash.query_one("#compare-table")),
                    "the comparison table")
        table = text_of(dash.query_one("#compare-table"))
        assert "2.7 bits" in table
        impq = result.row("impq", 2.7)
        assert f"{format_ppl(impq.ppl)} @{impq.avg_bits:.2f}" in table
        assert LABELS["zscore"] in table and "IMPQ /" in table
        await pilot.press("q")
        await until(pilot, lambda: app.return_code is not None, "the app to exit")

    app = ImpqApp(str(run_dir), cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        await pilot.press("5")
        await until(pilot, lambda: "saved comparison" in text_of(app.screen.query_one("#compare-status")),
                    "the saved comparison (read off the event loop)")
        assert f"{format_ppl(impq.ppl)} @{impq.avg_bits:.2f}" in text_of(
            app.screen.query_one("#compare-table"))
        await pilot.press("q")


@pilot_test
@pytest.mark.parametrize("damage", ["status-not-an-object", "lock-on-another-host", "samples-a-folder"])
async def test_damaged_run_files_never_crash_the_app(tmp_path, damage):
    """status.json that is not an object, a run.lock naming another host with a time that
    is not a number, samples.jsonl that is a folder: the app stays up, and says what is
    wrong where it cannot show the run."""
    import shutil

    from impq_tui.screens.modals import ErrorModal

    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests/fixtures/run-tiny8", run)
    if damage == "status-not-an-object":
        (run / "status.json").write_text("[1, 2]")
    elif damage == "lock-on-another-host":
        (run / "run.lock").write_text("pid 123 on otherhost")
        (run / "status.json").write_text('{"state": "running", "pid": 123, "time": "soon"}')
    else:
        (run / "samples.jsonl").unlink()
        (run / "samples.jsonl").mkdir()
    app = ImpqApp(run_dir=str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(1.5)
        assert app.is_running
        if damage == "samples-a-folder":
            assert isinstance(app.screen, ErrorModal)
            assert "is a folder" in app.screen.message
        else:
            assert isinstance(app.screen, Dashboard)
