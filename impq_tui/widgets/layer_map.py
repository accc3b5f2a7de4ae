"""The layer-bit map: one cell per decoder layer, coloured by the bits it gets at the
current budget and saying them as text too (monochrome terminals, colour-blind users):
in full, each cell's index, bits ("4b") and Shapley estimate; compact, one digit a
layer, in groups of ten. Every level of the run has its colour: the lowest the low
colour, the highest the high one, those between running from low through mid to high."""
from __future__ import annotations

from rich.color import Color, blend_rgb
from rich.style import Style
from rich.text import Text
from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from impq_tui.report import fmt_nats

CELL = 8      # characters per cell
GAP = 1
GROUP = 10    # compact: layers per group (a space between groups)
PENDING = "·"


class LayerMap(Widget):
    """Cells wrap to the widget's width; a layer whose bits changed in the last re-solve
    is marked with a dot (compact: underlined). Clicking a cell posts LayerMap.Picked."""

    COMPONENT_CLASSES = {"layer-map--high", "layer-map--mid", "layer-map--low",
                         "layer-map--pending", "layer-map--changed", "layer-map--picked"}
    DEFAULT_CSS = """
    LayerMap { height: auto; }
    LayerMap > .layer-map--mid { background: $primary 50%; color: $text; }
    """

    bits: reactive[tuple[int, ...] | None] = reactive(None, layout=True)
    phi: reactive[tuple[float, ...] | None] = reactive(None, layout=True)
    picked: reactive[int | None] = reactive(None)
    compact: reactive[bool] = reactive(False, layout=True)
    levels: reactive[tuple[int, ...]] = reactive((2, 4))    # the run's precisions, ascending

    class Picked(Message):
        def __init__(self, layer: int) -> None:
            super().__init__()
            self.layer = layer

    def __init__(self, *, compact: bool = False, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.set_reactive(LayerMap.compact, compact)
        self.changed: frozenset[int] = frozenset()

    def show(self, bits: tuple[int, ...] | None, phi: tuple[float, ...] | None) -> None:
        old = self.bits
        self.changed = frozenset(i for i, (a, b) in enumerate(zip(old, bits))
                                 if a != b) if old and bits and len(old) == len(bits) else frozenset()
        self.phi = phi
        self.bits = bits

    @property
    def count(self) -> int:
        return len(self.bits or self.phi or ())

    def _cell_width(self) -> int:
        return 1 if self.compact else CELL

    def _per_row(self, width: int) -> int:
        if self.compact:      # whole groups of ten while one fits, then what fits
            groups = (width + 1) // (GROUP + 1)
            return groups * GROUP if groups else max(1, width)
        return max(1, (width + GAP) // (self._cell_width() + GAP))

    def get_content_height(self, container, viewport, width: int) -> int:
        if not self.count:
            return 1
        rows = -(-self.count // self._per_row(width))
        return rows * (1 if self.compact else 2)

    def render(self) -> Text:
        L = self.count
        if not L:
            return Text("" if self.compact else "no allocation yet: it appears after the first sample",
                        style="dim")
        per_row = self._per_row(self.size.width)
        styles = self.level_styles()
        changed = self.get_component_rich_style("layer-map--changed", partial=True)
        picked = self.get_component_rich_style("layer-map--picked", partial=True)
        out = Text(no_wrap=True, overflow="crop")
        for start in range(0, L, per_row):
            rows = [Text(no_wrap=True)] if self.compact else [Text(no_wrap=True), Text(no_wrap=True)]
            for i in range(start, min(start + per_row, L)):
                b = self.bits[i] if self.bits else None
                style = styles.get(b, styles[None])
                if i == self.picked:
                    style = style + picked
                if self.compact:
                    if i > start and (i - start) % GROUP == 0:
                        rows[0].append(" ")
                    mark = changed + Style(underline=True) if i in self.changed else Style()
                    rows[0].append(str(b) if b else PENDING, style + mark)
                    continue
                mark = "•" if i in self.changed else " "
                head = f"{i:>3} {b}b" if b else f"{i:>3}   "
                rows[0].append(f"{head:<7}", style)
                rows[0].append(mark, style + changed if mark != " " else style)
                phi = fmt_nats(self.phi[i]) if self.phi else ""
                rows[1].append(f"{phi:>7} ", style)
                for row in rows:
                    row.append(" " * GAP)
            for row in rows:
                out.append_text(row)
                out.append("\n")
        out.rstrip()
        return out

    def level_styles(self) -> dict[int | None, Style]:
        """The style of each level (None: no allocation yet)."""
        low = self.get_component_rich_style("layer-map--low")
        high = self.get_component_rich_style("layer-map--high")
        styles: dict[int | None, Style] = {None: self.get_component_rich_style("layer-map--pending")}
        levels = sorted(self.levels)
        if len(levels) == 2:
            return styles | {levels[0]: low, levels[1]: high}
        mid = self.get_component_rich_style("layer-map--mid")
        for k, b in enumerate(levels):
            t = k / (len(levels) - 1)
            if t in (0.0, 1.0):
                styles[b] = low if t == 0 else high
                continue
            a, z, share = (low, mid, 2 * t) if t < 0.5 else (mid, high, 2 * t - 1)
            if share == 0.0 or a.bgcolor is None or z.bgcolor is None:
                styles[b] = a
                continue
            bg = blend_rgb(a.bgcolor.get_truecolor(), z.bgcolor.get_truecolor(), share)
            styles[b] = mid + Style(bgcolor=Color.from_triplet(bg))
        return styles

    def layer_at(self, x: int, y: int) -> int | None:
        """The layer drawn at (x, y), if any."""
        per_row = self._per_row(self.size.width)
        if self.compact:
            group, offset = divmod(x, GROUP + 1)
            col = group * GROUP + offset if offset < GROUP else None
            row = y
        else:
            col, row = x // (CELL + GAP), y // 2
        if col is None or col >= per_row:
            return None
        i = row * per_row + col
        return i if 0 <= i < self.count else None

    def on_click(self, event: events.Click) -> None:
        i = self.layer_at(event.x, event.y)
        if i is not None:
            self.picked = i
            self.post_message(self.Picked(i))
