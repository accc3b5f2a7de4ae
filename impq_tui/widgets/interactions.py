"""The interaction view: K as a grid of coloured cells, one row and one column per layer
(red: the pair costs more together than apart, blue: less), with the scale and the
strongest pairs beside it."""
from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget


class KGrid(Widget):
    """Rows i, columns j, cell colour K_ij on a diverging scale symmetric around zero.
    The colours are computed off the UI thread (diverging_colors)."""

    DEFAULT_CSS = "KGrid { width: auto; height: auto; }"

    K: reactive[np.ndarray | None] = reactive(None, always_update=True, layout=True)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.cell_colors: list | None = None

    def show(self, K: np.ndarray | None, colors: list | None) -> None:
        self.cell_colors = colors
        self.K = K

    @property
    def cell(self) -> int:
        return 3 if self.K is not None and self.K.shape[0] <= 24 else 2

    def get_content_width(self, container, viewport) -> int:
        if self.K is None:
            return 40
        return 4 + self.cell * self.K.shape[0]

    def get_content_height(self, container, viewport, width: int) -> int:
        return 1 if self.K is None else 1 + self.K.shape[0]

    def render(self) -> Text:
        if self.K is None or self.cell_colors is None:
            return Text("K needs at least 2 samples", style="dim")
        L, w = self.K.shape[0], self.cell
        every = 1 if w == 3 else 5
        head = Text(" " * 4, no_wrap=True)
        for j in range(L):
            head.append(f"{j:>{w - 1}} " if j % every == 0 else " " * w, "dim")
        out = Text(no_wrap=True)
        out.append_text(head)
        for i in range(L):
            out.append(f"\n{i:>3} ", "dim")
            for j in range(L):
                r, g, b = self.cell_colors[i][j]
                out.append(" " * w, Style(bgcolor=Color.from_rgb(r, g, b)))
        return out


def interaction_scale(K: np.ndarray) -> float:
    """The largest off-diagonal |K_ij|: the colour scale's end. The diagonal holds the
    variances, usually larger; it saturates rather than washing the pairs out."""
    off = np.abs(K - np.diag(np.diag(K)))
    return float(off.max()) if K.shape[0] > 1 and off.max() > 0 else float(np.max(np.abs(K))) or 1.0


def diverging_colors(K: np.ndarray, scale: float | None = None) -> list[list[tuple[int, int, int]]]:
    """RGB per cell from matplotlib's RdBu colormap, symmetric around zero, so that sign
    and size read at a glance (and stay distinct at 256 colours)."""
    from matplotlib import colormaps

    scale = scale or interaction_scale(K)
    rgba = colormaps["RdBu_r"](np.clip((K / scale + 1) / 2, 0, 1))
    return [[tuple(int(255 * c) for c in cell[:3]) for cell in row] for row in rgba]


def scale_legend(K: np.ndarray) -> Text:
    """A strip from -s through 0 to +s, s the largest off-diagonal |K_ij|."""
    m = interaction_scale(K)
    cells = diverging_colors(np.linspace(-m, m, 11).reshape(1, -1), m)[0]
    text = Text(f"{-m:.1e} ", "dim")
    for r, g, b in cells:
        text.append("  ", Style(bgcolor=Color.from_rgb(r, g, b)))
    text.append(f" {m:+.1e}", "dim")
    return text
