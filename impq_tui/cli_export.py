"""`impq-tui export DIR --bits B --backend quanto|hqq|gptq --out OUT`: the run's IMPQ
allocation at B bits, written as a quantized model (core.export)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    from impq_tui.cli import _bits, _device, _positive, _real, add_local_argument

    p = subparsers.add_parser(
        "export", help="write a run's allocation as a quantized model (quanto, hqq or gptq)",
        description="Solve the run's IMPQ allocation at --bits and write the model with each "
                    "decoder layer at its bit-width in the backend's own format, with the "
                    "tokenizer, allocation.json and a README that says how to load it.")
    p.add_argument("run_dir", metavar="DIR", help="the run directory")
    p.add_argument("--bits", type=_bits, required=True, help="target average bits per weight, 2.0 to 4.0")
    p.add_argument("--backend", choices=("quanto", "hqq", "gptq"),
                   help="format of the export (default: the run's backend); gptq needs the "
                        "optional extra impq-tui[gptq]")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to create for the export")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--alpha", type=_real, default=0.5,
                   help="shrinkage of the covariance toward its diagonal (default 0.5)")
    add_local_argument(p)
    p.add_argument("--eval", action="store_true",
                   help="measure perplexity of the quantized model on the evaluation text")
    p.add_argument("--verify", action="store_true",
                   help="also load the export back in a fresh process with its README's snippet "
                        "and measure perplexity on the same tokens (implies --eval)")
    p.add_argument("--eval-text", default="builtin", help="builtin, wikitext2, c4 or a path (default builtin)")
    p.add_argument("--eval-windows", type=_positive, help="evaluation windows (default 16 on CPU, 32 on GPU)")
    p.add_argument("--eval-window-tokens", type=_positive, help="tokens per evaluation window")
    p.add_argument("--device", type=_device, help="cuda, cuda:N or cpu (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    return p


def cmd_export(args) -> int:
    from rich.console import Console

    from core import events
    from core.evaluate import allocate
    from core.export import export_model
    from core.runs import RunDir
    from impq_tui.cli import check_text_early, check_window_tokens, method_name

    check_window_tokens(args.eval_window_tokens, "--eval-window-tokens")
    _check_out(args.out)
    run = RunDir.open(args.run_dir)
    alloc = allocate(run, bits=args.bits, alpha=args.alpha, local=args.local)
    if args.eval or args.verify:    # before the model is loaded, quantized and written
        check_text_early(args.eval_text, "--eval-text")
    console = Console(stderr=True)

    def callback(event) -> None:
        if isinstance(event, events.Log):
            console.print(f"[dim]{event.message}[/]", highlight=False)

    _interrupt_on_termination()
    result = export_model(run, list(alloc.bits_per_layer), args.backend or run.config.backend,
                          args.out, force=args.force, target_bits=args.bits, evaluate=args.eval,
                          verify=args.verify, eval_text=args.eval_text, eval_windows=args.eval_windows,
                          eval_window_tokens=args.eval_window_tokens, device=args.device,
                          method=method_name(args), callback=callback)
    if args.json:
        print(json.dumps({**result.to_json(), "allocation": alloc.to_json(), "run": str(run.path)}))
        return 0
    high = sum(b == 4 for b in result.bits_per_layer)
    print(f"{result.backend} export in {result.out_dir}: {high} of {len(result.bits_per_layer)} "
          f"layers at 4 bits")
    print(f"quantized weights {result.bytes:,} B (budget {result.budget_bytes:,} B at "
          f"{args.bits:.2f} bits), {result.avg_bits:.3f} bits/weight with metadata; "
          f"weight files on disk {result.disk_bytes:,} B")
    if result.ppl is not None:
        reloaded = (f", {result.ppl_reloaded:.4f} loaded back in a fresh process"
                    if result.ppl_reloaded is not None else "")
        print(f"perplexity {result.ppl:.4f} ({result.eval_tokens:,} tokens of {args.eval_text}){reloaded}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _check_out(out: str) -> None:
    """Refuse an --out that would replace the folder the user works in: an empty --out
    (an unset "$OUT") or "." is the current directory, which --force would move aside
    and delete once the export is written."""
    from pathlib import Path

    from core.errors import UserError

    if not out.strip():
        raise UserError("--out is empty: name the folder to create for the export.")
    if out.startswith("~") and os.path.expanduser(out) == out:
        raise UserError(f"--out {out!r}: there is no such user's home folder to expand "
                        f"{out.split('/')[0]!r} to.")
    target = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target in (cwd, *cwd.parents, Path.home().resolve()):
        raise UserError(f"--out {out!r} is {target}, which is or holds the current directory "
                        "(or is the home folder): the export would replace it. Name a new "
                        "folder, e.g. --out exports/my-model.")


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a dropped SSH session) stop the export like Ctrl-C does, so the
    half-written folder is removed on the way out."""
    def handler(_signum, _frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


if __name__ == "__main__":  # pragma: no cover - run through impq_tui.cli
    sys.exit("use: impq-tui export ...")
