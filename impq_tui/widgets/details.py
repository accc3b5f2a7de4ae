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
from impq_tui.report import fmt_bytes
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
        m, a = self.fit.model, self.allocation
        high = sum(b == 4 for b in a.bits_per_layer)
        lines = [f"[b]{high}[/b] of {len(a.bits_per_layer)} layers at 4 bits, "
                 f"{len(a.bits_per_layer) - high} at 2 bits; φ in nats/token from {m.samples} "
                 "samples. Click a cell for its numbers."]
        noise = noise_note(self.fit, a if self.method == IMPQ else None)
        if noise is not None:
            lines[0] = f"[$warning]Still noise ({noise}).[/] " + lines[0]
        i = self.picked
        if i is not None and i < len(m.phi):
            # the linear term of the model that chose: the paper's a, IMPQ-fit's u (the
            # loss of the layer alone at 2 bits); IMPQ-local's depends on the budget
            term = ""
            if self.method == IMPQ:
                term = f" · a {m.a[i]:+.5f}"
            elif self.method == IMPQ_FIT and self.fitted_u is not None:
                term = f" · u {self.fitted_u[i]:+.5f} ({model_label(IMPQ_FIT, short=True)})"
            lines.append(f"layer {i}: {a.bits_per_layer[i]} bits · φ {m.phi[i]:+.5f} ± "
                         f"{m.se[i]:.5f}{term} · {fmt_bytes(self.costs.m_lo[i])} "
                         f"at 2 bits, {fmt_bytes(self.costs.m_hi[i])} at 4 bits")
        return "\n".join(lines)


class InteractionDetail(Static):
    """Beside the K grid: what K is, its colour scale, and the strongest pairs."""

    fit: reactive[Fit | None] = reactive(None, layout=True, always_update=True)   # holds arrays
    method: reactive[str] = reactive(IMPQ, layout=True)

    def render(self) -> Text | str:
        if self.fit is None or not np.any(self.fit.model.K):
            return ""
        K = self.fit.model.K
        text = Text("K of IMPQ, the paper's model: covariance of the marginal vectors, shrunk "
                    "to its diagonal (α 0.5), nats². Colours end at the largest pair; the "
                    "diagonal (variances) saturates.\n", "dim")
        if self.method != IMPQ:
            text.append(f"The allocation is {model_label(self.method)}'s, whose pairwise "
                        "terms are not these.\n", "yellow")
        text.append("\n")
        text.append_text(scale_legend(K))
        text.append("\n\nstrongest pairs i×j\n", "bold")
        for i, j, k in top_interactions(K, 5):
            text.append(f"{i:>3} × {j:<3} {k:+.2e}\n")
        return text
