"""The dashboard's allocation model: IMPQ (the paper's), or our extensions IMPQ-local and
IMPQ-fit, chosen with `m`. On the frozen real SPQE run of tests/fixtures/run-tiny8 each
model's allocation is the one `impq-tui solve` (core.evaluate.allocate) computes, the
panes say which model they show, the choice is kept with the budget in the run's
ui.json, IMPQ-fit's refusal of too few samples is shown where its allocation would be,
and a fit that another choice made stale is killed."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from run_factory import copy_frozen, synthetic_run
from test_app import ROOT, pilot_test, settled, text_of, until

from core.errors import UserError
from core.evaluate import allocate
from core.fit import fit_states
from core.results import IMPQ, IMPQ_FIT, IMPQ_LOCAL
from core.runs import RunDir
from impq_tui import analysis
from impq_tui.app import ImpqApp
from impq_tui.screens.dashboard import UI_STATE, Dashboard
from impq_tui.screens.export import ExportScreen
from impq_tui.screens.modals import ErrorModal
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.panes import BudgetPane
from impq_tui.widgets.plots import FrontierPlot

FIXTURE = ROOT / "tests/fixtures/run-tiny8"
SIZE = (140, 36)       # wide enough that the budget pane's lines are not cut short


def budget_text(dash: Dashboard) -> str:
    return " ".join(text_of(w) for w in dash.query_one(BudgetPane).query("Static"))


def check_model(dash: Dashboard, method: str) -> None:
    """The allocation on screen is `impq-tui solve --bits B` (--local, --fit) of the saved
    run, and the panes name the model whose allocation and prediction they show."""
    expected = allocate(dash.run, bits=dash.bits, method=method)
    shown = dash.allocation
    assert dash.method == method
    assert shown.bits_per_layer == expected.bits_per_layer
    assert shown.bytes == expected.bytes and shown.budget_bytes == expected.budget_bytes
    assert shown.predicted_delta_nll == pytest.approx(expected.predicted_delta_nll, rel=1e-9, abs=1e-12)
    assert dash.query_one("#layer-map", LayerMap).bits == expected.bits_per_layer
    assert dash.query_one("#budget-strip", LayerMap).bits == expected.bits_per_layer
    label = analysis.model_label(method)
    budget = budget_text(dash)
    assert label in budget
    assert f"{expected.predicted_delta_nll:+.4f} nats/token by {analysis.LABELS[method]}" in budget
    assert ("our extension" in label) == (method != IMPQ)
    assert dash.query_one(FrontierPlot).TITLE.startswith(f"{label}:")


@pilot_test
async def test_each_model_gives_the_engines_allocation(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        check_model(dash, IMPQ)
        assert "IMPQ (paper)" in budget_text(dash)
        paper = dash.allocation.bits_per_layer
        await pilot.press("2")
        shown = {}
        for method in (IMPQ_LOCAL, IMPQ_FIT, IMPQ):
            await pilot.press("m")
            assert dash.method == method
            await settled(pilot)
            check_model(dash, method)
            assert text_of(dash.query_one("#bits-title")).startswith(
                f"{analysis.model_label(method)} allocation at 3.00 bits")
            shown[method] = dash.allocation.bits_per_layer
        # at 3 bits the fitted model keeps one more layer at 4 bits than the paper's
        assert shown[IMPQ_FIT] != paper and shown[IMPQ] == paper
        # the budget moved under IMPQ-fit re-solves its model, fitted once
        await pilot.press("m", "m")
        await settled(pilot)
        fitted = dash.fitted
        for key in ("left_square_bracket", "left_square_bracket", "right"):
            await pilot.press(key)
            await settled(pilot)
            check_model(dash, IMPQ_FIT)
        assert dash.bits == 2.55 and dash.fitted is fitted
        # its frontier is its own allocations' predictions
        await pilot.press("4")
        await until(pilot, lambda: dash.frontier is not None and len(dash.frontier) == 41,
                    "IMPQ-fit's frontier")
        for point in dash.frontier[::8]:
            assert point.predicted == pytest.approx(
                allocate(dash.run, bits=point.bits, method=IMPQ_FIT).predicted_delta_nll,
                rel=1e-9, abs=1e-12)
        # the export screen exports this model's allocation and says so
        await pilot.press("e")
        assert isinstance(app.screen, ExportScreen)
        export = app.screen
        assert export.method == IMPQ_FIT and export.allocation is dash.allocation
        assert "IMPQ-fit (our extension) allocation at 2.55 bits" in text_of(
            export.query_one("#export-title"))
        assert export.query_one("#export-out").value.endswith("quanto-2.55-fit")
        await pilot.press("escape")
        assert app.screen is dash


@pilot_test
async def test_the_model_is_remembered_with_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(Dashboard, "remember_headless", True)
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    (run / UI_STATE).write_text('{"bits": 2.6}')       # written before there was a choice
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        assert dash.bits == 2.6 and dash.method == IMPQ
        await pilot.press("m", "m", "right")
        await settled(pilot)
        check_model(dash, IMPQ_FIT)
        await until(pilot, lambda: json.loads((run / UI_STATE).read_text()).get("method")
                    == IMPQ_FIT, "ui.json")
    assert json.loads((run / UI_STATE).read_text()) == {"bits": 2.65, "method": IMPQ_FIT}
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        assert dash.method == IMPQ_FIT and dash.bits == 2.65   # before the first draw
        await settled(pilot)
        check_model(dash, IMPQ_FIT)


@pilot_test
async def test_too_few_samples_for_the_fit_say_so(tmp_path):
    run = copy_frozen(tmp_path / "run", samples=1)
    saved = RunDir.open(run)
    with pytest.raises(UserError) as refused:
        fit_states(saved.D(), saved.P())
    message = str(refused.value)
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        check_model(dash, IMPQ)                 # the paper's model works from one sample
        await pilot.press("2", "m", "m")
        await settled(pilot)
        assert dash.method == IMPQ_FIT and dash.fitted.error == message
        assert dash.allocation is None and not isinstance(app.screen, ErrorModal)
        assert message in text_of(dash.query_one("#bits-title"))
        assert message[:60] in budget_text(dash)
        assert dash.query_one("#layer-map", LayerMap).bits is None
        await pilot.press("4")
        await until(pilot, lambda: dash.frontier == [], "the empty frontier")
        assert message[:40] in text_of(dash.query_one(FrontierPlot))
        await pilot.press("e")                  # nothing to export: said, no screen
        assert app.screen is dash
        await pilot.press("m")                  # back to the paper's model
        await settled(pilot)
        check_model(dash, IMPQ)


@pilot_test
async def test_a_fit_made_stale_is_killed(tmp_path):
    """80 layers: the fit takes a minute on 2 cores, in a child process; choosing another
    model meanwhile kills it, and the event loop was never held up by it."""
    run = synthetic_run(tmp_path / "deep", 80, samples=20)
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        await pilot.press("m", "m")
        assert dash.method == IMPQ_FIT and dash.fitting
        await until(pilot, lambda: dash._fit_process is not None
                    and dash._fit_process._process is not None, "the fit's process")
        child = dash._fit_process._process
        await pilot.pause(0.5)
        assert child.poll() is None and "fitting on 20 samples…" in budget_text(dash)
        await pilot.press("m")                  # IMPQ: the fit is stale
        deadline = time.monotonic() + 5
        while child.poll() is None:
            assert time.monotonic() < deadline, "the stale fit's process was not killed"
            await pilot.pause(0.05)
        assert child.returncode != 0 and dash.fitted is None and not dash.fitting
        await settled(pilot)
        check_model(dash, IMPQ)


def test_the_models_match_the_engine_outside_the_app():
    """analysis.Allocations and its stability and frontier, by each model, against
    core.evaluate.allocate; the fit in a child process equals core.fit's, bit for bit."""
    run = RunDir.open(FIXTURE)
    D, P, costs = run.D(), run.P(), run.costs()
    allocations = analysis.Allocations(costs)
    fitted = analysis.FitProcess(D, P).result()
    direct = fit_states(D, P)
    assert np.array_equal(fitted.model.u, direct.u) and np.array_equal(fitted.model.W, direct.W)
    assert np.array_equal(fitted.model.f, direct.f) and direct.f[3:].any()   # the size term too
    assert fitted.model.lam == direct.lam and fitted.error is None
    for bits in (2.3, 2.5, 3.0, 3.45):
        for method in analysis.MODELS:
            got = allocations.get(D, bits, method=method, perms=P, fitted=fitted.model)
            want = allocate(run, bits=bits, method=method)
            assert got.q == want.q
            assert got.predicted_delta_nll == pytest.approx(want.predicted_delta_nll, rel=1e-9)
    # IMPQ-local's "unchanged for the last k samples" re-solves on the first m samples
    for bits in (2.5, 3.0):
        qs = [allocations.get(D[:m], bits, method=IMPQ_LOCAL, perms=P[:m]).q
              for m in range(len(D) - 10, len(D) + 1)]
        k = 0
        while k < 10 and qs[-2 - k] == qs[-1]:
            k += 1
        assert analysis.unchanged_for(D, allocations, bits, method=IMPQ_LOCAL, perms=P) == k
    assert analysis.unchanged_for(D, allocations, 3.0, method=IMPQ_FIT, perms=P) is None
    points = analysis.frontier_points(D, allocations, method=IMPQ_LOCAL, perms=P)
    assert [p.predicted for p in points[::10]] == pytest.approx(
        [allocate(run, bits=p.bits, method=IMPQ_LOCAL).predicted_delta_nll for p in points[::10]])
    assert analysis.next_model(IMPQ) == IMPQ_LOCAL and analysis.next_model(IMPQ_FIT) == IMPQ


@pilot_test
async def test_new_samples_are_fitted_again(tmp_path):
    """A run that goes on (here: its samples.jsonl grows, as a writer appends to it) with
    IMPQ-fit chosen: the model is fitted again to the samples on screen, and the
    allocation is the engine's of all of them."""
    run = copy_frozen(tmp_path / "run", samples=6)
    lines = (FIXTURE / "samples.jsonl").read_text().splitlines(keepends=True)
    app = ImpqApp(str(run), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        await pilot.press("m", "m")
        await settled(pilot)
        check_model(dash, IMPQ_FIT)
        assert dash.fitted.samples == 6
        with open(run / "samples.jsonl", "a") as f:
            f.writelines(lines[6:])
        await until(pilot, lambda: len(dash.D) == 12, "the new samples")
        await settled(pilot)
        assert dash.fitted.samples == 12 and dash.fitted.model.samples == 12
        check_model(dash, IMPQ_FIT)
        assert "fitted on" not in budget_text(dash) and "fitting" not in budget_text(dash)


def test_a_gain_below_every_measured_state_of_its_size_is_called_an_extrapolation():
    """Two walks over 3 layers: states with 2 low layers measured +0.5 and +0.9. A
    prediction of -0.2 for an allocation with 2 low layers is noted (with the least
    measured value); +0.3, below them but no gain over all-high, is not; nor -0.2 where a
    measured state of that size had -0.3; nor an allocation with none low."""
    from core.solver import Costs, solve

    D = np.array([[0.1, 0.4, 0.3], [0.3, 0.2, 0.6]])
    P = np.array([[0, 1, 2], [2, 0, 1]])          # step 2: {0, 1} 0.1 + 0.4, {2, 0} 0.6 + 0.3
    costs = Costs(m_lo=[10] * 3, m_hi=[30] * 3, params=[80] * 3)
    gain = solve(np.array([-0.1, -0.1, 5.0]), np.zeros((3, 3)), costs, budget=costs.B_hi - 40)
    less = solve(np.array([0.15, 0.15, 5.0]), np.zeros((3, 3)), costs, budget=costs.B_hi - 40)
    assert gain.q == less.q == (1, 1, 0)
    note = analysis.extrapolation_note(D, P, gain)
    assert "(least +0.50)" in note and "extrapolated" in note
    assert analysis.extrapolation_note(D, P, less) is None
    measured_gain = np.array([[0.1, -0.4, 0.3], [0.3, 0.2, 0.6]])       # {0, 1}: -0.3
    assert analysis.extrapolation_note(measured_gain, P, gain) is None
    all_high = solve(np.ones(3), np.zeros((3, 3)), costs, budget=costs.B_hi)
    assert analysis.extrapolation_note(D, P, all_high) is None
