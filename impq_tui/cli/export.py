"""`impq-tui export DIR --bits B --backend quanto|hqq|gptq --out OUT`: the run's IMPQ
allocation at B bits, written as a quantized model (core.export)."""
from __future__ import annotations

import json
import signal

from impq_tui.cli.args import (
    EXPORT_BACKENDS,
    FLAGS,
    add_evaluation_arguments,
    add_method_arguments,
    bits,
    device,
    method_name,
    real,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a run's allocation as a quantized model (quanto, hqq, gptq or gguf)",
        description="Solve the run's IMPQ allocation at --bits and write the model with each "
                    "decoder layer at its bit-width in the backend's own format, with the "
                    "tokenizer, allocation.json and a README that says how to load it.")
    p.add_argument("run_dir", metavar="DIR", help="the run directory")
    p.add_argument("--bits", type=bits, required=True, help="target average bits per weight, 2.0 to 4.0 (the run's lowest to highest level)")
    p.add_argument("--backend", choices=EXPORT_BACKENDS,
                   help="format of the export (default: the run's backend); gptq and gguf need the "
                        "optional extras impq-tui[gptq] / impq-tui[gguf]")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to create for the export")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--alpha", type=real, default=0.5,
                   help="shrinkage of the covariance toward its diagonal (default 0.5)")
    add_method_arguments(p)
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity of the quantized model on the evaluation text")
    p.add_argument("--verify", action="store_true",
                   help="also load the export back in a fresh process with its README's snippet "
                        "(gguf: run it in llama.cpp) and measure perplexity on the same tokens "
                        "(implies --eval)")
    add_evaluation_arguments(p)
    p.add_argument("--device", type=device, help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")


def request(args):
    from core.requests import ExportRequest

    return ExportRequest(run_dir=args.run_dir, bits=args.bits, out=args.out, backend=args.backend,
                         force=args.force, alpha=args.alpha, method=args.method, evaluate=args.eval,
                         verify=args.verify, eval_text=args.eval_text,
                         eval_windows=args.eval_windows,
                         eval_window_tokens=args.eval_window_tokens, device=args.device)


def command(args) -> int:
    from rich.console import Console

    from core import events
    from core.export import export_model
    from core.runs import RunDir
    from impq_tui.cli.solve import allocate_by
    from impq_tui.report import export_summary, log_line

    req = request(args)
    req.validate()
    run = RunDir.open(req.run_dir)
    console = Console(stderr=True)

    def callback(event) -> None:
        if isinstance(event, events.Log):
            console.print(log_line(event, FLAGS), highlight=False)

    _interrupt_on_termination()
    alloc = allocate_by(run, req.method, bits=req.bits, budget=None, alpha=req.alpha,
                        device=req.device, callback=callback)
    result = export_model(run, list(alloc.bits_per_layer), req.backend or run.config.backend,
                          req.out, force=req.force, target_bits=req.bits, evaluate=req.evaluate,
                          verify=req.verify, eval_text=req.eval_text, eval_windows=req.eval_windows,
                          eval_window_tokens=req.eval_window_tokens, device=req.device,
                          method=method_name(args), callback=callback)
    if args.json:
        print(json.dumps({**result.to_json(), "allocation": alloc.to_json(), "run": str(run.path)}))
    else:
        print("\n".join(export_summary(result, req.bits, req.eval_text)))
    return 0


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a dropped SSH session) stop the export like Ctrl-C does, so the
    half-written folder is removed on the way out."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)

