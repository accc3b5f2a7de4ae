"""Long jobs in the app show their progress where they run and stop on Esc within a
second, leaving nothing behind: compare on the dashboard, evaluate and export (with its
verify process) on the export screen, on a real tiny checkpoint. Also the frontier drawn
coarse budgets first, the budget remembered per run, the estimates called noise while
they are, and the clocks between a writer's reports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from core import events
from core.runs import RunDir
from core.spqe import Cancelled
from impq_tui import analysis
from impq_tui.app import ImpqApp
from impq_tui.screens.dashboard import UI_STATE, Dashboard
from impq_tui.screens.modals import ErrorModal
from impq_tui.widgets.compare import CompareView
from impq_tui.widgets.panes import BudgetPane, JobProgress, rates_line
from test_app import ROOT, SIZE, pilot_test

FIXTURE = ROOT / "tests/fixtures/run-tiny8"
STOP_S = 1.0          # Esc to the job ended: the promise
PATIENCE_S = 240      # a guard against hanging forever, not a timing assertion



async def until(pilot, condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if isinstance(pilot.app.screen, ErrorModal):
            raise AssertionError(f"waiting for {what}, the app showed: {pilot.app.screen.message}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await pilot.pause(0.02)


async def dashboard_settled(pilot) -> Dashboard:
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
    dash = app.screen
    await until(pilot, lambda: dash.is_current and dash.allocation is not None
                and not any(w.is_running for w in app.workers if w.group != "follow"),
                "the dashboard to settle")
    return dash


async def hit(pilot, key: str) -> None:
    """A key as the terminal delivers it, handled before this returns. (Pilot.press also
    waits until the process's CPU is idle, up to two seconds: a tiny model's job would be
    over by then.)"""
    from textual import events as textual_events

    event = textual_events.Key(key, None)
    event.set_sender(pilot.app)
    pilot.app._driver.send_message(event)
    await pilot.pause(0.02)


COMPARE_PHASES = ["loading the model", "quantizing layers", "baseline scores",
                  "solving allocations", "IMPQ-fit, checked: measuring candidates",
                  "evaluating allocations"]


def in_order(seen: list[str], phases: list[str]) -> bool:
    """The phases seen are among `phases`, each in its turn (none goes back)."""
    index = [phases.index(what) for what in dict.fromkeys(seen)]
    return index == sorted(index)


def text_of(widget) -> str:
    lines = widget.render_lines(widget.region.reset_offset)
    return " ".join(" ".join(line.text.split()) for line in lines).strip()


def recorded_steps(monkeypatch) -> list[events.Step]:
    """Every step a JobProgress bar shows."""
    seen: list[events.Step] = []
    original = JobProgress.step

    def step(self, step: events.Step) -> None:
        seen.append(step)
        original(self, step)

    monkeypatch.setattr(JobProgress, "step", step)
    return seen


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "run"
    subprocess.run([sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir),
                    "--samples", "3", "--windows", "4", "--window-tokens", "32", "--device", "cpu",
                    "--quiet", "--run-dir", str(path)], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return path


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    path = tmp_path / "run"
    shutil.copytree(finished_run, path)
    return path


# ------------------------------------------------------------------ Esc stops every job

@pilot_test
async def test_esc_stops_a_comparison_within_a_second(run_copy, monkeypatch):
    """The comparison is held in its baseline scores, running forward passes through the
    model until the layers' cancel check stops it (a tiny model's comparison would end
    before the key)."""
    import core.compare

    steps = recorded_steps(monkeypatch)
    scoring = threading.Event()

    def endless_scores(loaded, calib, *args):
        scoring.set()
        while True:
            loaded.model(input_ids=calib[:1])

    monkeypatch.setattr(core.compare, "_baseline_scores", endless_scores)
    app = ImpqApp(str(run_copy), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        dash = await dashboard_settled(pilot)
        view = dash.query_one(CompareView)
        await hit(pilot, "c")
        assert view.running and dash.query_one(JobProgress).running
        await until(pilot, scoring.is_set, "the baseline scores")
        bar = dash.query_one(JobProgress)
        assert "esc stops" in text_of(bar.query_one(".job-clock"))   # and how long it has run
        stopped = time.monotonic()
        await hit(pilot, "escape")
        await until(pilot, lambda: not view.running, "the comparison to stop")
        assert time.monotonic() - stopped < STOP_S
        assert not dash.query_one(JobProgress).running
        assert "stopped" in text_of(dash.query_one("#compare-status"))
        await until(pilot, lambda: not any(w.is_running for w in app.workers
                                           if w.group == "compare"), "the thread to end")
        assert time.monotonic() - stopped < STOP_S
    assert not (run_copy / "compare").exists()
    # steps that pile up merge into the latest (JobStep.can_replace): some may be skipped
    assert in_order([s.what for s in steps], COMPARE_PHASES[:3])
    layers = [s for s in steps if s.what == "quantizing layers"]
    assert [s.done for s in layers] == sorted(s.done for s in layers) and layers[-1].done == 4
    assert {s.total for s in layers} == {4}   # the tiny model's 4 decoder layers


@pilot_test
async def test_a_comparison_shows_its_phases_to_the_end(run_copy, monkeypatch):
    steps = recorded_steps(monkeypatch)
    app = ImpqApp(str(run_copy), bits=2.7, cursor_blink=False)
    async with app.run_test(size=(120, 40)) as pilot:
        dash = await dashboard_settled(pilot)
        view = dash.query_one(CompareView)
        await hit(pilot, "c")
        await until(pilot, lambda: not view.running, "the comparison")
        assert "compared" in text_of(dash.query_one("#compare-status"))
    assert in_order([s.what for s in steps], COMPARE_PHASES)
    assert steps[0].what == "loading the model"
    last = steps[-1]
    assert last.what == "evaluating allocations" and last.done == last.total > 1


@pilot_test
async def test_esc_stops_an_evaluation(run_copy, monkeypatch):
    steps = recorded_steps(monkeypatch)
    app = ImpqApp(str(run_copy), bits=2.5, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await dashboard_settled(pilot)
        await pilot.press("e")
        screen = app.screen
        await hit(pilot, "f6")
        assert screen.busy and screen.query_one(JobProgress).running
        await until(pilot, lambda: bool(steps), "the first step")
        stopped = time.monotonic()
        await hit(pilot, "escape")
        assert app.screen is screen            # Esc stops the job; it does not leave
        await until(pilot, lambda: not screen.busy, "the evaluation to stop")
        assert time.monotonic() - stopped < STOP_S
        assert "evaluation stopped" in text_of(screen.query_one("#export-result"))
        assert not screen.query_one(JobProgress).running
        await pilot.press("escape")            # now Esc goes back
        assert isinstance(app.screen, Dashboard)
    assert not (run_copy / "evals").exists()


@pilot_test
async def test_esc_stops_an_export_while_it_verifies(run_copy, tmp_path, monkeypatch):
    """The verify step's fresh process is killed, its temporary folder and the half-written
    export removed: nothing is left."""
    steps = recorded_steps(monkeypatch)
    out = tmp_path / "exported"
    verify_dirs = set(Path(tempfile.gettempdir()).glob("impq-verify-*"))
    app = ImpqApp(str(run_copy), bits=2.5, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await dashboard_settled(pilot)
        await pilot.press("e")
        screen = app.screen
        screen.query_one("#export-out").value = str(out)
        screen.query_one("#export-verify").value = True
        await hit(pilot, "f5")
        await until(pilot, lambda: any(s.what == "verifying" for s in steps), "the verify step")
        await pilot.pause(0.3)                  # the loader process is up and importing
        stopped = time.monotonic()
        await hit(pilot, "escape")
        await until(pilot, lambda: not screen.busy, "the export to stop")
        assert time.monotonic() - stopped < STOP_S
        assert "export stopped" in text_of(screen.query_one("#export-result"))
    assert not out.exists()
    assert list(tmp_path.glob(".exported*")) == []
    assert set(Path(tempfile.gettempdir()).glob("impq-verify-*")) == verify_dirs
    assert in_order([s.what for s in steps], ["starting", "loading the model",
                                              "quantizing (quanto)", "writing the files",
                                              "perplexity", "verifying"])
    assert {s.total for s in steps[1:]} == {6}     # with verify: six phases


def test_a_perplexity_pass_stops_within_a_layer(tiny_model_dir):
    """cancel_between_layers: once the event is set, no further decoder layer runs."""
    import torch

    from core.models import load_model
    from core.switching import perplexity

    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    tokens = torch.randint(0, 500, (6, 16))
    cancel = threading.Event()
    ran = []

    def count(_module, _args):
        ran.append(1)
        if len(ran) == 3:           # the first micro-batch, its third layer
            cancel.set()

    hooks = [layer.register_forward_pre_hook(count) for layer in loaded.layers]
    try:
        with events.cancel_between_layers(loaded.layers, cancel), pytest.raises(Cancelled):
            perplexity(loaded, tokens, micro_batch=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(ran) == 3
    cancel.clear()
    assert perplexity(loaded, tokens, micro_batch=2) > 1     # the hooks are gone


# ------------------------------------------------------------------ the frontier

def test_the_frontier_comes_coarse_budgets_first():
    run = RunDir.open(FIXTURE)
    D, costs = run.D(), run.costs()
    parts = list(analysis.frontier_progress(D, analysis.Allocations(costs), every_s=0.0))
    first, _ = parts[0]
    assert [p.bits for p in first] == [2.0, 2.5, 3.0, 3.5, 4.0]
    assert [complete for _, complete in parts] == [False] * (len(parts) - 1) + [True]
    sizes = [len(points) for points, _ in parts]
    assert sizes == sorted(sizes) and sizes[-1] == 41
    whole = analysis.frontier_points(D, analysis.Allocations(costs))
    assert parts[-1][0] == whole
    order = analysis.frontier_order()
    assert sorted(order) == [p.bits for p in whole] and len(set(order)) == 41
    # cancelled after three solves: nothing more is yielded
    calls = []
    stopped = list(analysis.frontier_progress(D, analysis.Allocations(costs),
                                              cancelled=lambda: calls.append(1) or len(calls) > 3))
    assert stopped == [] and len(calls) == 4
    assert analysis.frontier_points(D, analysis.Allocations(costs), cancelled=lambda: True) is None


@pilot_test
async def test_the_frontier_is_kept_per_sample_count():
    app = ImpqApp(str(FIXTURE), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        dash = await dashboard_settled(pilot)
        await pilot.press("4")
        await until(pilot, lambda: dash.frontier is not None and len(dash.frontier) == 41,
                    "the whole frontier")
        assert dash._frontiers[("impq", len(dash.D))] == dash.frontier
        # the same samples again (a reread folder) reuse it at once: no worker
        dash._frontier_of = None
        dash._maybe_frontier()
        assert dash._frontier_worker is None
        assert dash.frontier == dash._frontiers[("impq", len(dash.D))]


# ------------------------------------------------------------------ the budget and its labels

@pilot_test
async def test_the_budget_is_remembered_per_run(tmp_path, monkeypatch):
    monkeypatch.setattr(Dashboard, "remember_headless", True)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        dash = await dashboard_settled(pilot)
        assert dash.bits == 3.0
        for _ in range(3):
            await pilot.press("left")
        assert dash.bits == 2.85
        await until(pilot, lambda: (run / UI_STATE).is_file(), "ui.json")
        await pilot.press("left")
    assert json.loads((run / UI_STATE).read_text()) == {"bits": 2.8, "method": "impq"}   # on leaving
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        dash = await dashboard_settled(pilot)
        assert dash.bits == 2.8
        assert "2.80" in " ".join(text_of(w) for w in dash.query_one(BudgetPane).query("Static"))
    monkeypatch.setattr(Dashboard, "remember_headless", False)
    app = ImpqApp(str(FIXTURE), cursor_blink=False)       # headless: never read, never written
    async with app.run_test(size=SIZE) as pilot:
        dash = await dashboard_settled(pilot)
        await pilot.press("left")
    assert not (FIXTURE / UI_STATE).exists()


@pilot_test
async def test_the_budget_pane_names_nominal_and_effective_bits_and_bytes(tmp_path):
    from core.solver import budget_bytes
    from impq_tui.report import fmt_bytes

    app = ImpqApp(str(FIXTURE), cursor_blink=False)
    async with app.run_test(size=(160, 40)) as pilot:
        dash = await dashboard_settled(pilot)
        text = " ".join(text_of(w) for w in dash.query_one(BudgetPane).query("Static"))
        a = dash.allocation
        assert f"3.00 bits nominal = {fmt_bytes(budget_bytes(dash.costs, 3.0))}" in text
        assert f"{a.weight_bits:.2f} bits nominal, {a.avg_bits:.2f} effective (with scales)" in text
        assert a.avg_bits > a.weight_bits          # scales and zero points cost bits
        assert "noise" not in text                  # 12 samples of the fixture have settled


@pilot_test
async def test_few_samples_are_called_noise(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    lines = (run / "samples.jsonl").read_text().splitlines(True)
    (run / "samples.jsonl").write_text("".join(lines[:3]))
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=(160, 40)) as pilot:
        dash = await dashboard_settled(pilot)
        assert "estimates still noise" in " ".join(
            text_of(w) for w in dash.query_one(BudgetPane).query("Static"))
        assert "still noise" in text_of(dash.query_one("#settle-detail"))


def test_noise_note():
    from dataclasses import replace

    run = RunDir.open(FIXTURE)
    D, costs = run.D(), run.costs()
    allocations = analysis.Allocations(costs)
    assert "no standard errors" in analysis.noise_note(analysis.fit(D[:1]))
    assert "standard errors up to" in analysis.noise_note(analysis.fit(D[:3]),
                                                          allocations.get(D[:3], 3.0))
    fit, allocation = analysis.fit(D), allocations.get(D, 3.0)
    # the random-weight model's loss falls with layers at 2 bits, far outside the noise
    assert allocation.predicted_delta_nll < 0 and analysis.noise_note(fit, allocation) is None
    # a negative prediction within its standard error is noise
    tiny = replace(allocation, predicted_delta_nll=-1e-6)
    assert "negative predicted loss increase" in analysis.noise_note(fit, tiny)
    assert analysis.noise_note(fit, replace(allocation, predicted_delta_nll=1e-6)) is None


def test_the_elapsed_clock_runs_between_reports():
    progress = events.Progress(sample=2, samples=10, step=3, steps=8, evals=11, evals_per_s=2.0,
                               tokens_per_s=100.0, elapsed_s=61.0, eta_s=30.0, device="cpu")
    assert "elapsed 0:01:01" in rates_line(progress, "running")
    line = rates_line(progress, "running", age_s=2.0)
    assert "elapsed 0:01:03" in line and "ETA 0:00:28" in line


# ------------------------------------------------------------------ IMPQ-fit, checked on the export screen

@pilot_test
async def test_the_export_screen_measures_impq_fit_checked_once(run_copy, tmp_path, monkeypatch):
    """Ticked, IMPQ-fit, checked's candidates are measured with the model loaded before the
    evaluation (the allocation `solve --checked` gives), said in the log and the title;
    the export that follows writes that allocation without measuring again, in a folder of
    its own (-checked; the run's exports/ folder made for it)."""
    from core.compare import checked_allocation
    from core.results import IMPQ_CHECKED

    steps = recorded_steps(monkeypatch)
    expected = checked_allocation(RunDir.open(run_copy), bits=2.5, device="cpu").allocation
    app = ImpqApp(str(run_copy), bits=2.5, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await dashboard_settled(pilot)
        await pilot.press("e")
        screen = app.screen
        assert "IMPQ-fit, checked" not in text_of(screen.query_one("#export-title"))
        screen.query_one("#export-checked").value = True
        await pilot.pause(0.05)
        title = text_of(screen.query_one("#export-title"))
        assert "IMPQ-fit, checked (our extension)" in title and "when you export or evaluate" in title
        out = screen.query_one("#export-out").value
        assert out.endswith("quanto-2.50-checked")
        await hit(pilot, "f6")
        await until(pilot, lambda: not screen.busy, "the evaluation")
        assert screen.checked is not None
        assert screen.checked.allocation.bits_per_layer == expected.bits_per_layer
        title = text_of(screen.query_one("#export-title"))
        assert "when you export or evaluate" not in title and "bits/weight" in title
        saved = json.loads((run_copy / "evals/bits-2.50-checked-quanto.json").read_text())
        assert saved["method"] == IMPQ_CHECKED
        assert saved["allocation"]["bits_per_layer"] == list(expected.bits_per_layer)
        measured = [s for s in steps if s.what == "measuring candidates"]
        assert measured
        await hit(pilot, "f5")
        assert screen.busy, getattr(app.screen, "message", None)
        await until(pilot, lambda: not screen.busy, "the export")
        log = "\n".join(str(line.text) for line in screen.query_one("#export-log").lines)
        assert log.count("allocations measured on 16 calibration windows") == 1   # once, for both jobs
        assert [s for s in steps if s.what == "measuring candidates"] == measured
        assert "exported to" in text_of(screen.query_one("#export-result"))
    written = json.loads((Path(out) / "allocation.json").read_text())
    assert written["bits_per_layer"] == list(expected.bits_per_layer)
    assert written["method"] == IMPQ_CHECKED
    assert "IMPQ-fit, checked, an extension" in (Path(out) / "README.md").read_text().replace("\n", " ")


@pilot_test
async def test_esc_stops_impq_fit_checked_while_it_measures(run_copy, monkeypatch):
    """Esc while the candidates are measured stops within a second; nothing is kept."""
    steps = recorded_steps(monkeypatch)
    app = ImpqApp(str(run_copy), bits=2.5, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await dashboard_settled(pilot)
        await pilot.press("e")
        screen = app.screen
        screen.query_one("#export-checked").value = True
        await hit(pilot, "f6")
        await until(pilot, lambda: any(s.what == "measuring candidates" for s in steps),
                    "the measuring")
        stopped = time.monotonic()
        await hit(pilot, "escape")
        await until(pilot, lambda: not screen.busy, "the measuring to stop")
        assert time.monotonic() - stopped < STOP_S
        assert "evaluation stopped" in text_of(screen.query_one("#export-result"))
        assert screen.checked is None
    assert not (run_copy / "evals").exists()


@pilot_test
async def test_an_export_it_cannot_write_is_refused_before_measuring(run_copy, tmp_path, monkeypatch):
    """A folder that exists and is not empty is refused before the model is loaded for
    IMPQ-fit, checked; the folder is untouched and no exports/ folder is left in the run."""
    steps = recorded_steps(monkeypatch)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("earlier work")
    app = ImpqApp(str(run_copy), bits=2.5, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await dashboard_settled(pilot)
        await pilot.press("e")
        screen = app.screen
        screen.query_one("#export-checked").value = True
        screen.query_one("#export-out").value = str(taken)
        await hit(pilot, "f5")
        deadline = time.monotonic() + PATIENCE_S
        while not isinstance(app.screen, ErrorModal):
            assert time.monotonic() < deadline, "no error shown"
            await pilot.pause(0.02)
        assert "already exists and is not empty" in app.screen.message
        assert not any(s.what == "measuring candidates" for s in steps)
    assert [f.name for f in taken.iterdir()] == ["keep.txt"]
    assert not (run_copy / "exports").exists()
