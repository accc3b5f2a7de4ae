"""`impq-tui compare DIR --bits 2.25 2.5 3.0 3.5 [--json]`: IMPQ against the four
isolated baselines and the uniform references at equal memory, perplexity of the real
backend's quantized model on evaluation text (core.compare).

Also runnable alone: python -m impq_tui.cli_compare DIR ...
"""
from __future__ import annotations

import argparse
import json
import sys
import threading

from impq_tui.cli import (EXIT_CANCELLED, Parser, _bits, _device, _on_signals, _positive, _real,
                          _whole, check_text_early, check_window_tokens)


def add_compare_parser(sub) -> argparse.ArgumentParser:
    from core.compare import DEFAULT_BITS

    p = sub.add_parser("compare", help="IMPQ vs the baselines: perplexity at equal memory")
    add_compare_arguments(p, DEFAULT_BITS)
    return p


def add_compare_arguments(p: argparse.ArgumentParser, default_bits) -> None:
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--bits", type=_bits, nargs="+", default=list(default_bits),
                   help="target average bits per weight, each 2.0 to 4.0 "
                        f"(default {' '.join(map(str, default_bits))})")
    p.add_argument("--alpha", type=_real, default=0.5,
                   help="shrinkage of IMPQ's covariance toward its diagonal (default 0.5)")
    p.add_argument("--eval-text", default="builtin",
                   help="builtin, wikitext2, c4 or a path (default builtin: the evaluation half, "
                        "disjoint from the builtin calibration half)")
    p.add_argument("--eval-windows", type=_positive, help="evaluation windows (default 16 on CPU, 32 on GPU)")
    p.add_argument("--eval-window-tokens", type=_whole, help="tokens per evaluation window")
    p.add_argument("--backend", choices=("quanto", "hqq"), help="backend for the real model (default: the run's)")
    p.add_argument("--device", type=_device, help="cuda, cuda:N or cpu (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def cmd_compare(args) -> int:
    from rich.console import Console

    from core import events
    from core.compare import compare
    from core.runs import RunDir
    from core.spqe import Cancelled

    check_window_tokens(args.eval_window_tokens, "--eval-window-tokens")
    run = RunDir.open(args.run_dir)
    check_text_early(args.eval_text, "--eval-text")
    err = Console(stderr=True)

    def callback(event) -> None:
        if isinstance(event, events.Log) and not args.quiet:
            err.print(f"[dim]{event.message}[/]" if event.level == "info"
                      else f"[yellow]warning: {event.message}[/]")

    cancel = threading.Event()
    _on_signals(cancel)
    try:
        result = compare(run, args.bits, eval_text=args.eval_text, windows=args.eval_windows,
                         window_tokens=args.eval_window_tokens, backend=args.backend,
                         device=args.device, alpha=args.alpha, callback=callback, cancel=cancel)
    except Cancelled:
        print("impq-tui: compare stopped; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print_result(result, Console())
    return 0


def result_table(result):
    """The comparison as a rich Table: what the CLI prints and the app's Compare view shows."""
    from rich.table import Table

    headers, rows = result.table()
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


def print_result(result, console) -> None:
    console.print(result_table(result))
    console.print(describe_eval(result))
    t = result.timings
    console.print(f"{t['evaluations']} evaluations for {t['rows']} rows in {t['eval_s']:.1f} s; "
                  f"quantization {t['quantize_s']:.1f} s, baseline scores {t['scores_s']:.1f} s; "
                  f"budgets from the {result.costs_source} costs")
    for w in result.warnings:
        console.print(f"[yellow]warning: {w}[/]")
    for path in result.files:
        console.print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    from core.compare import DEFAULT_BITS
    from impq_tui.cli import run_reporting_errors

    parser = Parser(prog="impq-tui compare", description=__doc__.split("\n\n")[0])
    add_compare_arguments(parser, DEFAULT_BITS)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return run_reporting_errors(cmd_compare, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
