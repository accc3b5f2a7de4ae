"""`impq-tui eval DIR --bits B`: perplexity of the run's allocation with the real backend,
saved in the run's evals/ folder."""
from __future__ import annotations

import json
import sys

from impq_tui.cli import solve
from impq_tui.cli.args import (
    EXPORT_BACKENDS,
    add_budget_arguments,
    add_evaluation_arguments,
    device,
    file_stem,
    method_name,
)
from impq_tui.cli.errors import message, save_or_warn


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity of a run's allocation with the real backend")
    ev.add_argument("run_dir", metavar="DIR")
    add_budget_arguments(ev)
    add_evaluation_arguments(ev)
    ev.add_argument("--backend", choices=EXPORT_BACKENDS,
                    help="backend for the real model (default: the run's); gptq needs the gptq extra")
    ev.add_argument("--device", type=device, help="cuda, cuda:N or cpu (default: the run's)")


def request(args):
    from dataclasses import asdict

    from core.requests import EvalRequest

    return EvalRequest(**asdict(solve.request(args)), eval_text=args.eval_text,
                       eval_windows=args.eval_windows, eval_window_tokens=args.eval_window_tokens,
                       backend=args.backend, device=args.device)


def command(args) -> int:
    from core.evaluate import evaluate_allocation
    from impq_tui.report import eval_summary

    req = request(args)
    req.validate()
    run, alloc = solve.allocation(req)
    from core.fingerprint import unchecked

    if (note := unchecked(run.config)) is not None:
        print(f"impq-tui: warning: {message(note)}", file=sys.stderr)
    result = evaluate_allocation(run, list(alloc.bits_per_layer), eval_text=req.eval_text,
                                 windows=req.eval_windows, window_tokens=req.eval_window_tokens,
                                 backend=req.backend, device=req.device)
    record = {**result.to_json(), "method": method_name(args), "allocation": alloc.to_json(),
              "run": str(run.path)}
    save_or_warn(run, f"evals/{file_stem(args)}-{result.backend}.json", record)
    print(json.dumps(record) if args.json else eval_summary(result, alloc))
    return 0
