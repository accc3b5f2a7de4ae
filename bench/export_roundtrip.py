"""Export round trip per backend (a benchmark, not a test).

For a finished run, solves the IMPQ allocation at each target, measures it with
`impq-tui eval`'s function, exports it with every backend that is installed, loads each
export back in a fresh Python process with its README's snippet (the library's own
loader), and compares the three perplexities on the same evaluation tokens (eval, the
in-memory exported model, the reloaded export); reports the quantized weights' bytes
against the budget and the weight files' size on disk. Writes one JSON object.

    impq-tui run --samples 1 --windows 2 --window-tokens 64 --run-dir /tmp/smol
    python bench/export_roundtrip.py /tmp/smol --bits 2.5 3.0 --out roundtrip.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.evaluate import allocate, evaluate_allocation  # noqa: E402
from core.export import EXPORT_BACKENDS, ROUND_TRIP_RTOL, export_model, rel_diff  # noqa: E402
from core.runs import RunDir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--bits", type=float, nargs="+", default=[3.0])
    parser.add_argument("--backends", nargs="+", default=list(EXPORT_BACKENDS))
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-window-tokens", type=int, default=256)
    parser.add_argument("--exports", help="keep the exports here (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    args = parser.parse_args()

    run = RunDir.open(args.run_dir)
    root = Path(args.exports or tempfile.mkdtemp(prefix="impq-roundtrip-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for bits in args.bits:
        alloc = allocate(run, bits=bits)
        for backend in args.backends:
            evaluated = evaluate_allocation(run, list(alloc.bits_per_layer), backend=backend,
                                            windows=args.eval_windows,
                                            window_tokens=args.eval_window_tokens)
            result = export_model(run, list(alloc.bits_per_layer), backend,
                                  root / f"{backend}-{bits:.2f}", force=True, target_bits=bits,
                                  verify=True, eval_windows=args.eval_windows,
                                  eval_window_tokens=args.eval_window_tokens,
                                  callback=lambda e: print(f"  {e.message}", file=sys.stderr))
            dtype = json.loads((Path(result.out_dir) / "allocation.json").read_text())["dtype"]
            row = {**result.to_json(), "dtype": dtype, "rel_diff": rel_diff(result.ppl_reloaded, result.ppl),
                   "ppl_eval": evaluated.ppl, "eval_vs_export": rel_diff(evaluated.ppl, result.ppl),
                   "tolerance": ROUND_TRIP_RTOL[dtype]}
            rows.append(row)
            print(f"{backend:7s} {bits:.2f} bits: ppl {evaluated.ppl:.4f} by eval, {result.ppl:.4f} in memory, "
                  f"{result.ppl_reloaded:.4f} reloaded (rel {row['rel_diff']:.1e}, tol "
                  f"{row['tolerance']:g}); {result.bytes:,} B quantized <= budget "
                  f"{result.budget_bytes:,} B: {result.bytes <= result.budget_bytes}; "
                  f"{result.disk_bytes:,} B on disk; {result.seconds:.0f} s", file=sys.stderr)
    report = {"run": str(run.path), "model": run.config.model_name or run.config.model,
              "torch": torch.__version__, "machine": platform.machine(),
              "cpu_threads": torch.get_num_threads(), "exports": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
