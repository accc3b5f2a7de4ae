"""The text beside or under the dashboard's plots: how settled the estimates are, the
numbers of the picked layer, the strongest interactions. Each is a function of a few
reactives that the dashboard binds to its own (`data_bind`), so it redraws itself."""
from __future__ import annotations

import numpy as np
from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from core.solver import Allocation, Costs

from impq_tui.analysis import (
    IMPQ,
    IMPQ_FIT,
    STABILITY_WINDOW,
    Fit,
    model_label,
    noise_note,
    top_interactions,
)
from impq_tui.report import fmt_bytes, level_counts
from impq_tui.widgets.interactions import scale_legend


class SettleDetail(Static):
    """Under the estimates: samples, max se/|φ|, how long the allocation has held, and
    whether the estimates are still noise."""

    fit: reactive[Fit | None] = reactive(None, layout=True, always_update=True)   # holds arrays
    allocation: reactive[Allocation | None] = reactive(None, layout=True)
    unchanged: reactive[int | None] = reactive(None, layout=True)
    bits: reactive[float] = reactive(3.0, layout=True)
    method: reactive[str] = reactive(IMPQ, layout=True)

    def render(self) -> str:
        fit = self.fit
        if fit is None:
            return ""
        parts = [f"{fit.samples} samples"]
        if fit.settle:
            parts.append(f"max se/|φ| {fit.settle[-1]:.2f}")
        if self.unchanged is not None:
            window = min(fit.samples - 1, STABILITY_WINDOW)
            parts.append(f"the {model_label(self.method, short=True)} allocation at "
                         f"{self.bits:.2f} bits is unchanged by the last {self.unchanged} of "
                         f"{window} samples")
        text = " · ".join(parts)
        noise = noise_note(fit, self.allocation if self.method == IMPQ else None)
        if noise is not None:
            text = (f"[$warning]The estimates are still noise ({noise}): the allocation and "
                    f"its predicted loss will move with more samples.[/]\n{text}")
        return text


class LayerDetail(Static):
    """Under the bit map: the split at this budget, and the numbers of the picked layer."""

    fit: reactive[Fit | None] = reactive(None, layout=True, always_update=True)   # holds arrays
    allocation: reactive[Allocation | None] = reactive(None, layout=True)
    costs: reactive[Costs | None] = reactive(None, layout=True)
    picked: reactive[int | None] = reactive(None, layout=True)
    method: reactive[str] = reactive(IMPQ, layout=True)
    fitted_u: reactive[np.ndarray | None] = reactive(None, layout=True, always_update=True)

    def render(self) -> str:
        if self.fit is None or self.allocation is None or self.costs is None:
            return ""
        if self.costs.steps > 1:
            return self._render_levels()
        m, a = self.fit.model, self.allocation
        lo, hi = self.costs.levels
        high = sum(b == hi for b in a.bits_per_layer)
        lines = [f"[b]{high}[/b] of {len(a.bits_per_layer)} layers at {hi} bits, "
                 f"{len(a.bits_per_layer) - high} at {lo} bits; φ in nats/token from {m.samples} "
                 "samples. Click a cell for its numbers."]
        noise = noise_note(self.fit, a if self.method == IMPQ else None)
        if noise is not None:
            lines[0] = f"[$warning]Still noise ({noise}).[/] " + lines[0]
        i = self.picked
        if i is not None and i < len(m.phi):
            lines.append(f"layer {i}: {a.bits_per_layer[i]} bits · φ {m.phi[i]:+.5f} ± "
                         f"{m.se[i]:.5f}{self._term(i)} · {fmt_bytes(self.costs.m_lo[i])} "
                         f"at {lo} bits, {fmt_bytes(self.costs.m_hi[i])} at {hi} bits")
        return "\n".join(lines)

    def _term(self, j: int) -> str:
        """The linear term of drop j in the model that chose: the paper's a, IMPQ-fit's u
        (the loss of the drop alone); IMPQ-local's depends on the budget."""
        if self.method == IMPQ:
            return f" · a {self.fit.model.a[j]:+.5f}"
        if self.method == IMPQ_FIT and self.fitted_u is not None and j < len(self.fitted_u):
            return f" · u {self.fitted_u[j]:+.5f} ({model_label(IMPQ_FIT, short=True)})"
        return ""

    def _render_levels(self) -> str:
        """More than two levels: the layers per level; the picked layer's whole drop (its
        steps summed), its bytes at every level, and each step's own numbers."""
        fit, a, costs = self.fit, self.allocation, self.costs
        m, S, levels = fit.model, costs.steps, costs.levels
        lines = [f"{level_counts(a.bits_per_layer, levels)}; φ in nats/token from {m.samples} "
                 f"samples, per layer the sum of its {S} steps "
                 f"({levels[-1]}→{levels[0]} bits). Click a cell for its numbers."]
        noise = noise_note(fit, a if self.method == IMPQ else None)
        if noise is not None:
            lines[0] = f"[$warning]Still noise ({noise}).[/] " + lines[0]
        i = self.picked
        if i is not None and i < costs.L:
            sizes = ", ".join(f"{fmt_bytes(size[i])} at {b}" for b, size in zip(levels, costs.sizes))
            lines.append(f"layer {i}: {a.bits_per_layer[i]} bits · φ {fit.layer_phi[i]:+.5f} ± "
                         f"{fit.layer_se[i]:.5f} over its {S} steps · {sizes} bits")
            for k in range(S):
                j = i * S + k
                lines.append(f"  step {levels[S - k]}→{levels[S - k - 1]} bits: φ {m.phi[j]:+.5f} "
                             f"± {m.se[j]:.5f}{self._term(j)}")
        return "\n".join(lines)


class InteractionDetail(Static):
    """Beside the K grid: what K is, its colour scale, and the strongest pairs."""

    fit: reactive[Fit | None] = reactive(None, layout=True, always_update=True)   # holds arrays
    method: reactive[str] = reactive(IMPQ, layout=True)
    legend: reactive[list | None] = reactive(None, layout=True)   # the scale's colours, once known

    def render(self) -> Text | str:
        if self.fit is None or not np.any(self.fit.model.K):
            return ""
        K = self.fit.layer_K
        text = Text("K of IMPQ, the paper's model: covariance of the marginal vectors, shrunk "
                    "to its diagonal (α 0.5), nats². Colours end at the largest pair; the "
                    "diagonal (variances) saturates.\n", "dim")
        if self.fit.steps > 1:
            text.append(f"Per layer pair, K summed over both layers' {self.fit.steps} steps "
                        "(the pair's term with both taken to the lowest level).\n", "dim")
        if self.method != IMPQ:
            text.append(f"The allocation is {model_label(self.method)}'s, whose pairwise "
                        "terms are not these.\n", "yellow")
        text.append("\n")
        if self.legend is not None:
            text.append_text(scale_legend(K, self.legend))
        else:          # its colours are on their way (analysis.legend_colors)
            text.append("colour scale…", "dim")
        text.append("\n\nstrongest pairs i×j\n", "bold")
        for i, j, k in top_interactions(K, 5):
            text.append(f"{i:>3} × {j:<3} {k:+.2e}\n")
        return text
