"""The dashboard's plots, drawn by plotext through textual-plotext. Each widget keeps the
data it was given and redraws from it when shown or resized."""
from __future__ import annotations

from rich.text import Text
from textual_plotext import PlotextPlot

from impq_tui.analysis import BITS_MAX, BITS_MIN, Fit, FrontierPoint

# Below this size plotext has fewer than three rows or about twenty columns for data: it
# collapses the points onto one line and, smaller still, prints its y labels upside down.
MIN_WIDTH, MIN_HEIGHT = 24, 8

PHI_COLOR = "cyan"
BAND_COLOR = "gray"
MARK_COLOR = "orange"


class _Plot(PlotextPlot):
    EMPTY = "waiting for the first samples"
    TITLE = ""

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.has_data = False

    def render(self):
        width, height = self.size
        if width < MIN_WIDTH or height < MIN_HEIGHT:
            return Text(f"{self.TITLE}\n\ntoo small to plot: {width}×{height}, it needs "
                        f"{MIN_WIDTH}×{MIN_HEIGHT}", style="dim", overflow="fold")
        return super().render()

    def _reset(self, title: str) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title(title)

    def _empty(self, title: str) -> None:
        self._reset(title)
        self.plt.text(self.EMPTY, 0.5, 0.5, alignment="center", color=BAND_COLOR, background="default")
        self.plt.xlim(0, 1)
        self.plt.ylim(0, 1)
        self.plt.xticks([], [])
        self.plt.yticks([], [])
        self.refresh()


class EstimatesPlot(_Plot):
    """phi_i per layer with a band of +- one standard error. With more than two levels,
    a layer's phi is the sum of its steps' (its whole drop from the highest level to the
    lowest), with the standard error of that sum (analysis.LayerTerms)."""

    TITLE = "φ per layer (nats/token) ± se"

    def on_mount(self) -> None:
        self._empty(self.TITLE)

    def show(self, fit: Fit | None, levels: tuple[int, ...] = (2, 4)) -> None:
        title = self.TITLE if fit is None or fit.steps == 1 else (
            f"φ per layer, {max(levels)}→{min(levels)} bits: its {fit.steps} steps summed ± se")
        self.shown_title = title
        if fit is None:
            return self._empty(title)
        phi, se = fit.layer_phi, fit.layer_se
        x = list(range(len(phi)))
        self._reset(title)
        plt = self.plt
        plt.horizontal_line(0, color=BAND_COLOR)
        if fit.samples >= 2:
            plt.error(x, list(phi), yerr=list(2 * se), color=BAND_COLOR)   # yerr spans ±yerr/2
        plt.scatter(x, list(phi), color=PHI_COLOR, marker="●")
        plt.xlabel("layer")
        plt.xticks(_ticks(len(phi)))
        plt.xlim(-0.5, len(phi) - 0.5)
        self.has_data = True
        self.refresh()


class SettlePlot(_Plot):
    """How the estimates settle: the largest se relative to its estimate, per sample count."""

    EMPTY = "needs 2 samples"

    TITLE = "max se/|φ| over samples"

    def on_mount(self) -> None:
        self._empty(self.TITLE)

    def show(self, fit: Fit | None) -> None:
        if fit is None or not fit.settle:
            self.EMPTY = "needs 2 samples" if not (fit and fit.paired) else "needs 2 pairs"
            return self._empty(self.TITLE)
        plt = self.plt
        self._reset(self.TITLE)
        plt.plot(list(fit.settle_m), list(fit.settle), color=PHI_COLOR, marker="braille")
        plt.xlabel("samples")
        plt.xticks(_nice_ticks(fit.settle_m[0], fit.settle_m[-1]))
        plt.ylim(0, max(fit.settle) * 1.05 or 1)
        self.has_data = True
        self.refresh()


class FrontierPlot(_Plot):
    """Predicted loss increase of the optimal allocation against the target bits, by the
    allocation model named in the title (set_model)."""

    WHAT = "predicted Δloss, nats/token"     # after the model's name: fits 60 columns
    TITLE = WHAT
    EMPTY = "the frontier appears after the first sample"

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.points: list[FrontierPoint] = []
        self.bits: float | None = None
        self.y: float | None = None
        self.note: str | None = None     # why there is no frontier (set_model)
        self.levels: tuple[int, ...] = (int(BITS_MIN), int(BITS_MAX))    # the run's

    def on_mount(self) -> None:
        self.show()

    def set_model(self, label: str, note: str | None = None) -> None:
        """The model whose predictions are drawn (analysis.model_label), and, while it has
        no frontier, why (IMPQ-fit being fitted, or refused)."""
        title = f"{label}: {self.WHAT}"
        if (title, note) != (self.TITLE, self.note):
            self.TITLE, self.note = title, note
            self.show()

    def render(self):
        if not self.points and self.note:      # a sentence, wrapped, rather than plotted
            return Text.assemble((self.TITLE, "bold"), "\n\n", (self.note, "yellow"),
                                 overflow="fold", justify="center")
        return super().render()

    def show(self, points: list[FrontierPoint] | None = None, bits: float | None = None,
             y: float | None = None) -> None:
        """y: Delta at `bits` when known exactly (else the nearest grid point's)."""
        if points is not None:
            self.points = points
        if bits is not None:
            self.bits, self.y = bits, y
        if not self.points:
            return self._empty(self.TITLE)
        plt = self.plt
        self._reset(self.TITLE)
        xs = [p.bits for p in self.points]
        ys = [p.predicted for p in self.points]
        plt.plot(xs, ys, color=PHI_COLOR, marker="braille")
        if self.bits is not None:
            plt.vertical_line(self.bits, color=MARK_COLOR)
            y = self.y if self.y is not None else min(
                self.points, key=lambda p: abs(p.bits - self.bits)).predicted
            plt.scatter([self.bits], [y], color=MARK_COLOR, marker="●")
        lo, hi = min(self.levels), max(self.levels)
        plt.xlim(lo, hi)
        ticks = [lo + (hi - lo) * k / 4 for k in range(5)]
        plt.xticks([int(t) if t == int(t) else t for t in ticks])
        plt.xlabel("target bits per weight")
        self.has_data = True
        self.refresh()


def _nice_ticks(first: int, last: int, most: int = 6) -> list[int]:
    """Whole-number ticks at multiples of 1, 2, 5, 10, 20, 50, ... from first to last."""
    steps = (m * 10 ** e for e in range(12) for m in (1, 2, 5))
    step = next(st for st in steps if (last - first) // st + 1 <= most)
    start = -(-first // step) * step
    return sorted({first, *range(start, last + 1, step)})


def _ticks(stop: int, start: int = 0, most: int = 8) -> list[int]:
    """Whole-number ticks from start below stop, at most `most` of them."""
    step = max(1, -(-(stop - start) // most))
    return list(range(start, stop, step))
