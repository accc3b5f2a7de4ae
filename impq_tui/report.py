"""How results read, in one place: byte sizes, durations and losses; the allocation and
comparison tables; the eval and export summaries; the engine's log lines. Rich
renderables and plain strings, used by the CLI, the app's widgets and bench/ alike (no
Textual here)."""
from __future__ import annotations

import math

from rich.console import Group
from rich.table import Table
from rich.text import Text

from core.errors import render

# ------------------------------------------------------------------ numbers


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def fmt_nats(x: float) -> str:
    """A loss value in nats, short enough for a map cell (7 characters)."""
    if not math.isfinite(x):
        return "-"
    return f"{x:+.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:+.0e}"


def log_line(event, names: dict[str, str] | None = None) -> Text:
    """An engine log event (core.events.Log): info dimmed, a warning in yellow, each
    `field` in the words of `names` (core.errors.render). Text, not markup, so that a path
    with brackets in the message prints as it is."""
    message = render(event.message, names or {})
    if event.level == "info":
        return Text(message, style="dim")
    return Text(f"warning: {message}", style="yellow")


# ------------------------------------------------------------------ solve, eval, export


def allocation_report(alloc, model, costs, source: str, method: str = "impq") -> Group:
    """`impq-tui solve`: per layer its bits, Shapley estimate (phi, se) and bytes, then the
    budget and the predicted loss. `model` is the run's QuadraticModel, `source` the run."""
    from core.results import LABELS

    kind = LABELS[method]
    table = Table(title=f"{kind} allocation, {source} ({model.samples} samples); phi and se "
                        "are the Shapley estimates" + ("" if costs.steps == 1 else
                                                       " of each step down, from the top"))
    for col in ("layer", "bits", "phi (nats)", "se", "bytes"):
        table.add_column(col, justify="right")
    S, top = costs.steps, costs.levels[-1]
    for i, bits in enumerate(alloc.bits_per_layer):
        steps = range(i * S, (i + 1) * S)
        table.add_row(str(i), Text(str(bits), style="bold green" if bits == top else "yellow"),
                      " / ".join(f"{model.phi[j]:.5f}" for j in steps),
                      " / ".join(f"{model.se[j]:.5f}" for j in steps),
                      f"{costs.sizes[costs.levels.index(bits)][i]:,}")
    target = f"{alloc.target_bits:.2f} bits" if alloc.target_bits is not None else "byte budget"
    return Group(
        table,
        f"target {target}: budget {alloc.budget_bytes:,} B, used {alloc.bytes:,} B; "
        f"effective {alloc.avg_bits:.3f} bits/weight with metadata ({alloc.weight_bits:.3f} "
        f"without); {level_counts(alloc.bits_per_layer, costs.levels)}",
        f"predicted loss increase over all-{top}-bit: {alloc.predicted_delta_nll:.5f} nats/token; "
        f"SCIP {alloc.status} in {alloc.seconds * 1000:.0f} ms")


def high_layers(bits_per_layer) -> int:
    return sum(b == 4 for b in bits_per_layer)


def level_counts(bits_per_layer, levels=(2, 4)) -> str:
    """"12 of 30 layers at 4 bits" (two levels); "layers at 4/3/2 bits: 10/12/8" (more)."""
    levels = sorted(levels)
    if len(levels) == 2:
        top = levels[-1]
        return f"{sum(b == top for b in bits_per_layer)} of {len(bits_per_layer)} layers at {top} bits"
    return (f"layers at {'/'.join(map(str, levels[::-1]))} bits: "
            + "/".join(str(sum(b == lv for b in bits_per_layer)) for lv in levels[::-1]))


def eval_summary(result, alloc) -> str:
    """`impq-tui eval`: one line, the real modules' perplexity beside the simulated one."""
    simulated = ("" if result.ppl_simulated is None      # GPTQ: nothing to simulate
                 else f", {result.ppl_simulated:.3f} (simulated)")
    return (f"{result.backend} at {alloc.avg_bits:.3f} effective bits ({alloc.weight_bits:.2f} "
            f"nominal): perplexity {result.ppl:.3f} (real modules){simulated}; unquantized "
            f"{result.ppl_original:.3f}; {result.eval_tokens:,} tokens of {result.eval_text}")


def export_summary(result, target_bits: float, eval_text: str) -> list[str]:
    """`impq-tui export`: where, how big, and (with --eval) the perplexity, then the notes."""
    used = set(result.bits_per_layer)
    levels = sorted(used | {2, 4}) if used <= {2, 4} else sorted(used)   # the paper's, or those used
    lines = [f"{result.backend} export in {result.out_dir}: "
             f"{level_counts(result.bits_per_layer, levels)}",
             f"quantized weights {result.bytes:,} B (budget {result.budget_bytes:,} B at "
             f"{target_bits:.2f} bits), {result.avg_bits:.3f} bits/weight with metadata; "
             f"weight files on disk {result.disk_bytes:,} B"]
    if result.ppl is not None:
        reloaded = (f", {result.ppl_reloaded:.4f} loaded back in a fresh process"
                    if result.ppl_reloaded is not None else "")
        lines.append(f"perplexity {result.ppl:.4f} ({result.eval_tokens:,} tokens of "
                     f"{eval_text or 'the default evaluation text'}){reloaded}")
    return lines + [f"note: {note}" for note in result.notes]


# ------------------------------------------------------------------ compare


def format_ppl(ppl: float) -> str:
    """Four significant figures or more: 12.34, 123.4, 45,678."""
    return f"{ppl:,.0f}" if ppl >= 1000 else f"{ppl:.4g}" if ppl >= 1 else f"{ppl:.3f}"


def compare_rows(result) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a comparison (core.compare's CompareResult): one row per method,
    one perplexity column per budget with the effective bits beside it, then each of our
    models' ratio to the best baseline, then the uniform references."""
    from core.results import IMPQ, IMPQ_CHECKED, IMPQ_FIT, IMPQ_LOCAL, LABELS

    def cell(r) -> str:
        return f"{format_ppl(r.ppl)} @{r.avg_bits:.2f}"

    headers = ["method", *(f"{b:g} bits" for b in result.bits)]
    rows = [[LABELS[m], *(cell(result.row(m, b)) for b in result.bits)] for m in result.methods]
    for m in (IMPQ, IMPQ_LOCAL, IMPQ_FIT, IMPQ_CHECKED):
        if ratios := result.versus_best_baseline(m):
            rows.append([f"{LABELS[m]} / best baseline",
                         *(f"{r['ratio']:.3f} ({LABELS[r['best_baseline']]})" for r in ratios)])
    for label, r in result.uniform():
        rows.append([label, *([cell(r)] * len(result.bits))])
    rows.append(["unquantized", *([format_ppl(result.ppl_original)] * len(result.bits))])
    return headers, rows


def compare_table(result) -> Table:
    """The comparison as what the CLI prints and the app's Compare view shows."""
    headers, rows = compare_rows(result)
    table = Table(title=f"perplexity @ effective bits: {result.model}, {result.backend} "
                        f"(group {result.group_size}), IMPQ from {result.samples} samples")
    for k, h in enumerate(headers):
        table.add_column(h, justify="left" if k == 0 else "right")
    n = len(result.methods)   # then the ratio rows, then the references
    r = n + sum(row[0].endswith("/ best baseline") for row in rows)
    for k, row in enumerate(rows):
        style = "bold" if k == 0 else ("dim" if k >= r else None)
        table.add_row(*row, style=style, end_section=k in (n - 1, r - 1))
    return table


def describe_eval(result) -> str:
    ev = result.eval
    return (f"evaluation: {ev['tokens']:,} tokens of {ev['description']} "
            f"({ev['windows']} x {ev['window_tokens']}, sha256 {ev['tokens_sha256'][:12]}), "
            f"the same for every method; calibration {result.calib['windows']} x "
            f"{result.calib['window_tokens']} tokens of {result.calib['text']}")


def compare_report(result) -> Group:
    """`impq-tui compare` (and bench/quality.py): the table, what was measured on, how
    long it took, warnings and the files written."""
    t = result.timings
    return Group(
        compare_table(result), describe_eval(result),
        f"{t['evaluations']} evaluations for {t['rows']} rows in {t['eval_s']:.1f} s; "
        f"quantization {t['quantize_s']:.1f} s, baseline scores {t['scores_s']:.1f} s; "
        f"budgets from the {result.costs_source} costs",
        *(Text(f"warning: {w}", style="yellow") for w in result.warnings),
        *(f"wrote {path}" for path in result.files))


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub markdown table (first column left, the others right-aligned), as lines."""
    return ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]
