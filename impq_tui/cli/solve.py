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


def allocation(req, callback=None):
    """The run and its allocation at the request's budget (core.evaluate.allocate; IMPQ-fit,
    checked: core.compare.checked_allocation, which loads the model on the request's device,
    the run's without one, and logs what it measured to `callback`, standard error without)."""
    from core.runs import RunDir

    run = RunDir.open(req.run_dir)
    return run, allocate_by(run, req.method, bits=req.bits, budget=getattr(req, "budget_bytes", None),
                            alpha=req.alpha, device=getattr(req, "device", None),
                            callback=callback or _log)


def allocate_by(run, method: str, *, bits, budget, alpha, device, callback):
    from core.evaluate import IMPQ_CHECKED, allocate

    if method == IMPQ_CHECKED:
        from core.compare import checked_allocation

        return checked_allocation(run, bits=bits, budget=budget, alpha=alpha, device=device,
                                  callback=callback).allocation
    return allocate(run, bits=bits, budget=budget, alpha=alpha, method=method)


def _log(event) -> None:
    """What IMPQ-fit, checked measured (it loads the model), on standard error."""
    import sys

    from core import events

    if isinstance(event, events.Log):
        print(f"impq-tui: {event.message}", file=sys.stderr, flush=True)


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
