"""The layer-bit map: one cell per decoder layer, coloured by the bits it gets at the
current budget, with its index and Shapley estimate."""
from __future__ import annotations

from rich.text import Text
from textual import events
from textual.message import Message
from textual.reactive import reactive
from textual.widget import Widget

from impq_tui.report import fmt_nats

CELL = 8      # characters per cell
GAP = 1


class LayerMap(Widget):
    """Cells wrap to the widget's width; a layer whose bits changed in the last re-solve
    is marked with a dot. Clicking a cell posts LayerMap.Picked."""

    COMPONENT_CLASSES = {"layer-map--high", "layer-map--low", "layer-map--pending",
                         "layer-map--changed", "layer-map--picked"}
    DEFAULT_CSS = """
    LayerMap { height: auto; }
    """

    bits: reactive[tuple[int, ...] | None] = reactive(None, layout=True)
    phi: reactive[tuple[float, ...] | None] = reactive(None, layout=True)
    picked: reactive[int | None] = reactive(None)
    compact: reactive[bool] = reactive(False, layout=True)

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
        return 3 if self.compact else CELL

    def _per_row(self, width: int) -> int:
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
        styles = {4: self.get_component_rich_style("layer-map--high"),
                  2: self.get_component_rich_style("layer-map--low"),
                  None: self.get_component_rich_style("layer-map--pending")}
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
                mark = "•" if i in self.changed else " "
                if self.compact:
                    rows[0].append(f"{i:>2}{mark}", style)
                else:
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

    def on_click(self, event: events.Click) -> None:
        L = self.count
        if not L:
            return
        per_row = self._per_row(self.size.width)
        col = event.x // (self._cell_width() + GAP)
        row = event.y // (1 if self.compact else 2)
        i = row * per_row + col
        if col < per_row and 0 <= i < L:
            self.picked = i
            self.post_message(self.Picked(i))
