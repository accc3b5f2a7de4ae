"""The interaction view: K as a grid of coloured cells, one row and one column per layer
(red: the pair costs more together than apart, blue: less), with the scale and the
strongest pairs beside it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

# K's colours are computed with the analysis (in the solver process): importing matplotlib
# on the event loop would hold it for a quarter of a second.
from impq_tui.analysis import diverging_colors, interaction_scale, legend_colors  # noqa: F401


@dataclass(frozen=True)
class GridLayout:
    """How K is drawn in the space there is: `width` characters per column, rows stacked
    two to a line with half blocks (`half`), and `step` layers per cell when even one
    character per layer is too wide (each cell then shows its block's strongest entry)."""
    width: int
    half: bool = False
    step: int = 1

    def columns(self, L: int) -> int:
        return -(-L // self.step)

    def chars(self, L: int) -> int:
        return LABEL + self.width * self.columns(L)

    def lines(self, L: int) -> int:
        rows = self.columns(L)
        return 1 + (-(-rows // 2) if self.half else rows)


LABEL = 4          # the row labels' width


def grid_layout(L: int, width: int, height: int | None = None) -> GridLayout:
    """The roomiest way to draw an L x L grid in `width` characters (and `height` lines,
    where known): 3 or 2 characters a cell, then one character and half-block rows (cells
    as square as those, in half the lines), then blocks of layers."""
    for layout in (GridLayout(3), GridLayout(2)):
        if (layout.width < 3 or L <= 24) and layout.chars(L) <= width and (
                height is None or layout.lines(L) <= height):
            return layout
    if GridLayout(1, half=True).chars(L) <= width:
        return GridLayout(1, half=True)
    step = max(1, -(-L // max(width - LABEL, 1)))
    return GridLayout(1, half=True, step=step)


class KGrid(Widget):
    """Rows i, columns j, cell colour K_ij on a diverging scale symmetric around zero.
    The colours are computed off the UI thread (diverging_colors). The grid fits the width
    it is given: narrower cells, then two rows a line, then blocks of layers."""

    DEFAULT_CSS = "KGrid { width: 100%; height: auto; }"

    K: reactive[np.ndarray | None] = reactive(None, always_update=True, layout=True)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cell_colors: list | None = None

    def show(self, K: np.ndarray | None, colors: list | None) -> None:
        self.cell_colors = colors
        self.K = K

    def layout_for(self, width: int) -> GridLayout:
        """The layout for `width`, preferring one that fits the height of the scrolling
        pane around the grid (it scrolls otherwise)."""
        parent = self.parent
        height = parent.scrollable_content_region.height if parent is not None else None
        return grid_layout(self.K.shape[0], width, height or None)

    def get_content_height(self, container, viewport, width: int) -> int:
        return 1 if self.K is None else self.layout_for(width).lines(self.K.shape[0])

    def render(self) -> Text:
        if self.K is None or self.cell_colors is None:
            return Text("K needs 2 samples", style="dim")
        layout = self.layout_for(self.size.width)
        colors = self._block_colors(layout.step)
        n, w = len(colors), layout.width
        out = Text(no_wrap=True, overflow="crop")
        out.append_text(self._header(n, w, layout.step))
        for r in range(0, n, 2 if layout.half else 1):
            out.append(f"\n{r * layout.step:>3} ", "dim")
            for j in range(n):
                top = Color.from_rgb(*colors[r][j])
                if not layout.half:
                    out.append(" " * w, Style(bgcolor=top))
                elif r + 1 < n:
                    out.append("▀", Style(color=top, bgcolor=Color.from_rgb(*colors[r + 1][j])))
                else:
                    out.append("▀", Style(color=top))
        return out

    @staticmethod
    def _header(n: int, w: int, step: int) -> Text:
        """Column numbers: every column at 3 characters a cell, every fifth below."""
        every = 1 if w == 3 else 5
        chars = [" "] * (n * w)
        for j in range(0, n, every):
            label = str(j * step).rjust(max(w - 1, 1))
            chars[j * w:j * w + len(label)] = label
        return Text(" " * LABEL + "".join(chars[:n * w]), "dim", no_wrap=True)

    def _block_colors(self, step: int) -> list:
        """The cells' colours; with blocks of `step` layers, each block's entry of the
        largest |K| (the strongest pair in it decides its colour)."""
        if step == 1:
            return self.cell_colors
        K, L = self.K, self.K.shape[0]
        blocks = []
        for bi in range(0, L, step):
            row = []
            for bj in range(0, L, step):
                block = np.abs(K[bi:bi + step, bj:bj + step])
                if bi == bj:       # leave the diagonal (variances) out of a diagonal block
                    block = block - np.diag(np.diag(block)) if block.shape[0] > 1 else block
                i, j = np.unravel_index(np.argmax(block), block.shape)
                row.append(self.cell_colors[bi + i][bj + j])
            blocks.append(row)
        return blocks


def scale_legend(K: np.ndarray, cells: list | None = None) -> Text:
    """A strip from -s through 0 to +s, s the largest off-diagonal |K_ij|: coloured
    blocks joined to their labels by no-break spaces, so that wrapping never drops the
    strip (it is no whitespace) nor parts it from its ends. cells: its colours
    (analysis.legend_colors, computed off the event loop) unless computed here."""
    m = interaction_scale(K)
    cells = cells if cells is not None else legend_colors()
    text = Text()
    text.append(f"{-m:.1e}\u00a0", "dim")
    for r, g, b in cells:
        text.append("█", Style(color=Color.from_rgb(r, g, b)))
    text.append(f"\u00a0{m:+.1e}", "dim")
    return text
