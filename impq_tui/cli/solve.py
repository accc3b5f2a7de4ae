"""`impq-tui solve DIR --bits B | --budget-bytes N`: the run's optimal allocation (SCIP),
saved in the run's allocations/ folder."""
from __future__ import annotations

import json

from impq_tui.cli.args import add_budget_arguments, file_stem, method_name
from impq_tui.cli.errors import save_or_warn


def add_parser(sub) -> None:
    solve = sub.add_parser("solve", help="the optimal allocation of a run at a budget (SCIP)")
    solve.add_argument("run_dir", metavar="DIR")
    add_budget_arguments(solve)


def request(args):
    from core.requests import SolveRequest

    return SolveRequest(run_dir=args.run_dir, bits=args.bits, budget_bytes=args.budget_bytes,
                        alpha=args.alpha, method=args.method)


def allocation(req):
    """The run and its allocation at the request's budget (core.evaluate.allocate)."""
    from core.evaluate import allocate
    from core.runs import RunDir

    run = RunDir.open(req.run_dir)
    return run, allocate(run, bits=req.bits, budget=req.budget_bytes, alpha=req.alpha,
                         method=req.method)


def command(args) -> int:
    from rich.console import Console

    from core.interactions import quadratic_model
    from impq_tui.report import allocation_report

    req = request(args)
    req.validate()
    run, alloc = allocation(req)
    record = {**alloc.to_json(), "method": method_name(args), "samples": len(run.samples()),
              "alpha": req.alpha, "run": str(run.path)}
    save_or_warn(run, f"allocations/{file_stem(args)}.json", record)
    if args.json:
        print(json.dumps(record))
    else:
        model = quadratic_model(run.D(), alpha=req.alpha, paired=run.config.antithetic)
        Console().print(allocation_report(alloc, model, run.costs(), str(run.path), req.method))
    return 0
