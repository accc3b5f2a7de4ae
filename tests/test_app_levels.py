"""The app on a run with more than two levels (README, "More than two levels"): a real
`run --levels 2 3 4` of the tiny Llama checkpoint (HQQ), opened on the dashboard; and the
form's Levels field, which reaches the run's config and scales the duration estimate."""
from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.evaluate import allocate
from core.runs import RunDir
from impq_tui import analysis, estimate
from impq_tui.app import ImpqApp
from impq_tui.report import fmt_bytes
from impq_tui.screens.dashboard import Dashboard
from impq_tui.screens.setup import SetupDefaults, SetupScreen, about
from impq_tui.widgets.details import LayerDetail
from impq_tui.widgets.interactions import KGrid
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.panes import BudgetPane, BudgetSlider
from impq_tui.widgets.plots import EstimatesPlot

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (2, 3, 4)
SIZE = (120, 40)
PATIENCE_S = 120


def pilot_test(test):
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


@pytest.fixture(scope="module")
def run234(tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("levels") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir), "--backend", "hqq",
         "--levels", "2", "3", "4", "--samples", "4", "--windows", "2", "--window-tokens", "48",
         "--device", "cpu", "--run-dir", str(run_dir), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_dir


async def settled(pilot) -> Dashboard:
    app = pilot.app
    deadline = time.monotonic() + PATIENCE_S
    await pilot.pause()
    while not (isinstance(app.screen, Dashboard) and app.screen.is_current
               and not any(w.is_running for w in app.workers if w.group != "follow")):
        assert time.monotonic() < deadline, "the dashboard never settled"
        await pilot.pause(0.05)
    await pilot.pause()
    return app.screen


def plain(widget) -> str:
    lines = widget.render_lines(widget.region.reset_offset)
    return " ".join(" ".join(line.text.split()) for line in lines).strip()


@pilot_test
async def test_budgets_solve_as_allocate_and_every_level_has_its_colour_and_digit(run234):
    run = RunDir.open(run234)
    app = ImpqApp(str(run234), cursor_blink=False, timings=False)
    async with app.run_test(size=SIZE) as pilot:
        dash = await settled(pilot)
        assert dash.query_one(BudgetSlider).levels == LEVELS
        dash.action_view("bits")
        seen_mid = False
        for bits in (2.0, 2.35, 2.7, 3.0, 3.3, 3.65, 4.0):
            dash.set_bits(bits)
            dash = await settled(pilot)
            expected = allocate(run, bits=bits)
            assert dash.allocation.bits_per_layer == expected.bits_per_layer, bits
            assert dash.allocation.bytes == expected.bytes
            full, strip = dash.query_one("#layer-map", LayerMap), dash.query_one("#budget-strip", LayerMap)
            assert full.bits == strip.bits == expected.bits_per_layer
            # each layer's cell says its bits: "3b" in full, the digit in the compact strip
            cells = plain(full)
            for i, b in enumerate(expected.bits_per_layer):
                assert f"{i} {b}b" in cells
            strip.compact = True
            await pilot.pause()
            assert plain(strip).replace(" ", "") == "".join(map(str, expected.bits_per_layer))
            counts = [sum(b == lv for b in expected.bits_per_layer) for lv in (4, 3, 2)]
            assert f"layers at 4/3/2 bits: {'/'.join(map(str, counts))}" in plain(
                dash.query_one(BudgetPane).query_one("#budget-solver"))
            seen_mid |= 3 in expected.bits_per_layer
        assert seen_mid, "no budget gave a 3-bit layer: the run shows nothing of its middle level"
        styles = full.level_styles()
        assert len({styles[b].bgcolor for b in LEVELS} | {styles[None].bgcolor}) == 4
        # the budget stays within the run's levels
        dash.set_bits(9.0)
        assert dash.bits == 4.0


@pilot_test
async def test_estimates_sum_each_layers_steps_with_the_se_of_the_row_sums(run234):
    run = RunDir.open(run234)
    costs, D = run.costs(), run.D()
    L, S = costs.L, costs.steps
    sums = D.reshape(len(D), L, S).sum(axis=2)
    app = ImpqApp(str(run234), cursor_blink=False, timings=False)
    async with app.run_test(size=SIZE) as pilot:
        dash = await settled(pilot)
        fit = dash.fit
        assert fit.model.phi.shape == (L * S,)
        np.testing.assert_allclose(fit.layer_phi, sums.mean(axis=0))
        np.testing.assert_allclose(fit.layer_se, sums.std(axis=0, ddof=1) / np.sqrt(len(D)))
        # not the sum of the steps' variances: the steps of a layer are correlated
        naive = np.sqrt((fit.model.se.reshape(L, S) ** 2).sum(axis=1))
        assert not np.allclose(fit.layer_se, naive)
        assert dash.query_one(EstimatesPlot).shown_title == \
            "φ per layer, 4→2 bits: its 2 steps summed ± se"
        assert dash.query_one(KGrid).K.shape == (L, L)
        np.testing.assert_allclose(dash.query_one(KGrid).K,
                                   fit.model.K.reshape(L, S, L, S).sum(axis=(1, 3)))
        # the picked layer: its whole drop, its bytes at every level, each step's φ
        dash.action_view("bits")
        dash.picked = 1
        await pilot.pause()
        text = plain(dash.query_one(LayerDetail))
        assert f"φ {fit.layer_phi[1]:+.5f} ± {fit.layer_se[1]:.5f} over its 2 steps" in text
        for b, size in zip(LEVELS, costs.sizes):
            assert f"{fmt_bytes(size[1])} at {b}" in text
        assert f"step 4→3 bits: φ {fit.model.phi[2]:+.5f}" in text
        assert f"step 3→2 bits: φ {fit.model.phi[3]:+.5f}" in text


def test_the_frontier_and_budgets_follow_the_levels():
    assert analysis.frontier_grid((2, 4)) == analysis.FRONTIER_GRID
    assert analysis.frontier_grid((2, 3, 4)) == analysis.FRONTIER_GRID
    grid = analysis.frontier_grid((4, 8))
    assert grid[0] == 4.0 and grid[-1] == 8.0 and len(grid) == 81
    assert analysis.clamp_bits(3.0, (4, 8)) == 4.0 and analysis.clamp_bits(9, (4, 8)) == 8.0
    assert analysis.clamp_bits(5.0) == 4.0


@pytest.fixture
def fixed_probe(monkeypatch):
    monkeypatch.setattr(estimate, "probe", lambda *args: (0.25, 0.6))
    monkeypatch.setattr(SetupScreen, "measured", {})


async def estimated(pilot) -> SetupScreen:
    deadline = time.monotonic() + PATIENCE_S
    while not (isinstance(pilot.app.screen, SetupScreen) and pilot.app.screen.estimate):
        assert time.monotonic() < deadline, "the form never showed its estimate"
        await pilot.pause(0.05)
    await pilot.pause()
    return pilot.app.screen


@pilot_test
async def test_the_forms_levels_reach_the_config_and_scale_the_estimate(fixed_probe, tmp_path):
    app = ImpqApp(setup=SetupDefaults(backend="hqq", samples=10, device="cpu",
                                      run_dir=str(tmp_path / "run")), cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        form = await estimated(pilot)
        levels = form.query_one("#levels")
        assert levels.value == "2 4"
        assert form.config().levels == (2, 4)
        two = plain(form.query_one("#setup-estimate"))
        two_s = form.estimate.run_s(10)
        assert f"≈ {about(two_s)} for 10 × 30 evaluations" in two
        levels.value = "2 3 4"
        await pilot.pause()
        assert form.config().levels == (2, 3, 4)
        three = plain(form.query_one("#setup-estimate"))
        assert form.estimate.run_s(10, 2) == pytest.approx(2 * two_s)
        assert f"≈ {about(2 * two_s)} for 10 × 30 × 2 evaluations" in three
        # quanto quantizes to 2, 4 and 8 bits: 2 3 4 is not offered, and the choice falls back
        form.query_one("#backend").value = "quanto"
        await pilot.pause()
        offered = {value for _, value in levels._options if value != levels.BLANK}
        assert offered == {"2 4", "4 8"}
        assert levels.value == "2 4" and form.config().levels == (2, 4)
        levels.value = "4 8"
        await pilot.pause()
        assert form.config().levels == (4, 8)
