"""Small terminals and no colour: the K grid fits the width it has, the layer map says
each layer's bits as text, and a plot too small to read says so instead."""
from __future__ import annotations

import asyncio
import functools

import numpy as np
import pytest
from textual.app import App

from impq_tui.widgets.interactions import (
    GridLayout,
    KGrid,
    diverging_colors,
    grid_layout,
)
from impq_tui.widgets.layer_map import LayerMap
from impq_tui.widgets.plots import MIN_HEIGHT, EstimatesPlot


def pilot_test(test):
    """Run an async Pilot test on a fresh event loop (no asyncio plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


@pytest.mark.parametrize("L", [2, 8, 30, 80, 200])
@pytest.mark.parametrize("width", [12, 30, 46, 80, 160])
def test_the_k_grid_never_overflows_its_width(L, width):
    assert grid_layout(L, width).chars(L) <= width


def test_the_k_grid_prefers_room_then_halves_then_blocks():
    assert grid_layout(8, 46) == GridLayout(3)
    assert grid_layout(30, 70) == GridLayout(2)
    assert grid_layout(30, 70, height=12) == GridLayout(1, half=True)    # 31 lines do not fit
    assert grid_layout(30, 46) == GridLayout(1, half=True)
    assert grid_layout(80, 40) == GridLayout(1, half=True, step=3)
    assert GridLayout(1, half=True, step=3).lines(80) == 1 + 14


def test_a_block_of_layers_shows_its_strongest_pair():
    K = np.zeros((4, 4))
    K[0, 1] = K[1, 0] = 0.1
    K[2, 3] = K[3, 2] = -1.0
    K[0, 3] = K[3, 0] = 0.3
    np.fill_diagonal(K, 5.0)        # variances: left out of a diagonal block
    grid = KGrid()
    grid.cell_colors = diverging_colors(K)
    grid.set_reactive(KGrid.K, K)
    blocks = grid._block_colors(2)
    assert blocks[0][0] == grid.cell_colors[0][1]     # the pair, not the variance
    assert blocks[1][1] == grid.cell_colors[2][3]     # the strongest is negative
    assert blocks[0][1] == grid.cell_colors[0][3]


class MapApp(App):
    def __init__(self, compact: bool) -> None:
        super().__init__()
        self.compact = compact

    def compose(self):
        yield LayerMap(compact=self.compact, id="map")


@pilot_test
async def test_the_budget_strip_says_bits_as_digits_in_groups_of_ten():
    bits = tuple([2] * 12 + [4] * 13)
    app = MapApp(compact=True)
    async with app.run_test(size=(30, 6)) as pilot:
        layer_map = app.query_one(LayerMap)
        layer_map.show(bits, tuple(0.0 for _ in bits))
        await pilot.pause()
        assert layer_map.render().plain.splitlines() == ["2222222222 2244444444", "44444"]
        assert layer_map.layer_at(12, 0) == 11 and layer_map.layer_at(10, 0) is None
        assert layer_map.layer_at(2, 1) == 22
        await pilot.click(LayerMap, offset=(13, 0))
        assert layer_map.picked == 12


@pilot_test
async def test_the_full_map_says_bits_as_text():
    app = MapApp(compact=False)
    async with app.run_test(size=(40, 8)) as pilot:
        layer_map = app.query_one(LayerMap)
        layer_map.show((2, 4, 4), (-0.01, 0.02, 0.03))
        await pilot.pause()
        first = layer_map.render().plain.splitlines()[0]
        assert "0 2b" in first and "1 4b" in first and "2 4b" in first


class PlotApp(App):
    CSS = "EstimatesPlot { height: 1fr; }"

    def compose(self):
        yield EstimatesPlot()


@pilot_test
async def test_a_plot_too_small_to_read_says_so():
    app = PlotApp()
    async with app.run_test(size=(60, MIN_HEIGHT - 1)) as pilot:
        await pilot.pause()
        assert "too small to plot" in app.query_one(EstimatesPlot).render().plain
    app = PlotApp()
    async with app.run_test(size=(60, MIN_HEIGHT + 4)) as pilot:
        await pilot.pause()
        assert "too small" not in str(app.query_one(EstimatesPlot).render())
