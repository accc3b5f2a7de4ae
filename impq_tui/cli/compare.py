"""`impq-tui compare DIR --bits 2.25 2.5 3.0 3.5 [--json]`: IMPQ against the four
isolated baselines and the uniform references at equal memory, perplexity of the real
backend's quantized model on evaluation text (core.compare)."""
from __future__ import annotations

import json
import sys
import threading

from core.errors import EXIT_CANCELLED
from impq_tui.cli.args import FLAGS, RUN_BACKENDS, add_evaluation_arguments, bits, device, real
from impq_tui.cli.run import on_signals


def add_parser(sub) -> None:
    from core.results import DEFAULT_BITS

    p = sub.add_parser("compare", help="IMPQ vs the baselines: perplexity at equal memory")
    p.add_argument("run_dir", metavar="DIR")
    p.add_argument("--bits", type=bits, nargs="+", default=list(DEFAULT_BITS),
                   help="target average bits per weight, each 2.0 to 4.0 (the run's levels) "
                        f"(default {' '.join(map(str, DEFAULT_BITS))})")
    p.add_argument("--alpha", type=real, default=0.5,
                   help="shrinkage of IMPQ's covariance toward its diagonal (default 0.5)")
    add_evaluation_arguments(p)
    p.add_argument("--backend", choices=RUN_BACKENDS, help="backend for the real model (default: the run's)")
    p.add_argument("--device", type=device, help="cuda, cuda:N or cpu (default: the run's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def request(args):
    from core.requests import CompareRequest

    return CompareRequest(run_dir=args.run_dir, bits=tuple(args.bits), alpha=args.alpha,
                          eval_text=args.eval_text, eval_windows=args.eval_windows,
                          eval_window_tokens=args.eval_window_tokens, backend=args.backend,
                          device=args.device)


def command(args) -> int:
    from rich.console import Console

    from core import events
    from core.compare import compare
    from core.runs import RunDir
    from core.spqe import Cancelled
    from impq_tui.report import compare_report, log_line

    req = request(args)
    req.validate()
    run = RunDir.open(req.run_dir)
    err = Console(stderr=True)

    def callback(event) -> None:
        if isinstance(event, events.Log) and not args.quiet:
            err.print(log_line(event, FLAGS))

    cancel = threading.Event()
    on_signals(cancel)
    try:
        result = compare(run, list(req.bits), eval_text=req.eval_text, windows=req.eval_windows,
                         window_tokens=req.eval_window_tokens, backend=req.backend,
                         device=req.device, alpha=req.alpha, callback=callback, cancel=cancel)
    except Cancelled:
        print("impq-tui: compare stopped; nothing was written", file=sys.stderr)
        return EXIT_CANCELLED
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        Console().print(compare_report(result))
    return 0
