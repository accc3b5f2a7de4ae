"""Do more levels pay? IMPQ with 2/3/4 bits against IMPQ with 2/4 and against the best
isolated baseline at the same levels, on the embedded SmolLM2-135M-Instruct (issue 18).

For each level set: SPQE into OUT/<backend>-<levels> (an existing run there is
continued), then core.compare over a grid of budgets (every method, the real backend's
modules, perplexity on the evaluation text, disjoint from the calibration text). Reports
per family (IMPQ, IMPQ-fit, best baseline; 2/4 and 2/3/4):
  - the smallest budget of the grid whose perplexity is within 10% of all-4-bit's,
  - the perplexity at 3.0 and 3.5 bits.
The best baseline is chosen per budget after the fact (the lowest perplexity of the four),
which favours the baselines. Writes OUT/levels.json and OUT/levels.md.

    python bench/levels.py --device cuda --out /tmp/levels          # GPU: the README's figures
    python bench/levels.py --samples 2 --windows 2 --window-tokens 64 --eval-windows 2 \\
        --eval-window-tokens 64 --grid 2.5 3.0 3.5 4.0 --device cpu --model TINY --out /tmp/lv  # smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core import events  # noqa: E402
from core.compare import compare  # noqa: E402
from core.engine import run_spqe  # noqa: E402
from core.models import pick_device  # noqa: E402
from core.results import BASELINES, IMPQ, IMPQ_FIT, UNIFORM_HIGH  # noqa: E402
from core.runs import CONFIG, RunConfig, RunDir  # noqa: E402
from core.settings import device_defaults  # noqa: E402
from impq_tui.report import format_ppl, log_line  # noqa: E402

GRID = tuple(round(2.25 + 0.125 * k, 3) for k in range(15))   # 2.25, 2.375, ..., 4.0
WITHIN = 1.10                                                 # of all-4-bit's perplexity


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--backend", default="hqq", choices=("hqq", "quanto"))
    p.add_argument("--level-sets", nargs="+", default=["2,4", "2,3,4"],
                   help="comma-separated level sets (default 2,4 and 2,3,4)")
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--grid", type=float, nargs="+", default=list(GRID))
    p.add_argument("--windows", type=int)
    p.add_argument("--window-tokens", type=int)
    p.add_argument("--eval-windows", type=int)
    p.add_argument("--eval-window-tokens", type=int)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-levels"))
    return p.parse_args(argv)


def open_run(path: Path, config: RunConfig) -> RunDir:
    if (path / CONFIG).is_file():
        run = RunDir.open(path)
        run.update_config(config)
        return run
    run = RunDir.create(path, config)
    run.unlock()
    return run


def one(args, levels: tuple[int, ...], log) -> dict:
    device = pick_device(args.device)
    d = device_defaults(device)
    config = RunConfig(model=args.model, backend=args.backend, group_size=args.group_size,
                       samples=args.samples, windows=args.windows or d["windows"],
                       window_tokens=args.window_tokens or d["window_tokens"], device=str(device),
                       dtype=d["dtype"], micro_batch=d["micro_batch"], levels=levels)
    run = open_run(Path(args.out) / f"{args.backend}-{'-'.join(map(str, levels))}", config)
    t0 = time.perf_counter()
    status = run_spqe(replace(run.config, samples=args.samples), run, log)
    if status != "completed":
        raise SystemExit(f"SPQE {status} for levels {levels}")
    spqe_s = time.perf_counter() - t0
    grid = [b for b in args.grid if levels[0] <= b <= levels[-1]]
    result = compare(run, grid, windows=args.eval_windows,
                     window_tokens=args.eval_window_tokens or config.window_tokens, callback=log)
    top = result.row(UNIFORM_HIGH, float(levels[-1]))
    families = {IMPQ: lambda b: result.row(IMPQ, b), IMPQ_FIT: lambda b: result.row(IMPQ_FIT, b),
                "best baseline": lambda b: min((result.row(m, b) for m in BASELINES), key=lambda r: r.ppl)}
    out = {"levels": list(levels), "samples": len(run.D()), "spqe_s": spqe_s,
           "seconds_per_sample": sum(r["seconds"] for r in run.samples()) / max(1, len(run.samples())),
           "ppl_all_top": top.ppl, "ppl_original": result.ppl_original, "eval": result.eval,
           "families": {}}
    for name, row in families.items():
        if name == IMPQ_FIT and IMPQ_FIT not in result.methods:
            continue
        rows = {b: row(b) for b in grid}
        within = [b for b in grid if rows[b].ppl <= WITHIN * top.ppl]
        out["families"][name] = {
            "smallest_within_10pct": min(within) if within else None,
            "ppl": {str(b): rows[b].ppl for b in grid},
            "method": {str(b): rows[b].method for b in grid},
            "bits_per_layer": {str(b): list(rows[b].bits_per_layer) for b in grid}}
    return out


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Hardware: {report['hardware']}", "",
             "| levels | method | smallest budget within 10% of all-4-bit | ppl at 3.0 bits | ppl at 3.5 bits |",
             "|---|---|---:|---:|---:|"]
    for r in report["results"]:
        for name, f in r["families"].items():
            smallest = f["smallest_within_10pct"]
            cells = [format_ppl(f["ppl"][b]) if b in f["ppl"] else "-" for b in ("3.0", "3.5")]
            lines.append(f"| {'/'.join(map(str, r['levels']))} | {name} | "
                         f"{smallest if smallest is not None else 'none in the grid'} | "
                         f"{cells[0]} | {cells[1]} |")
    r0 = report["results"][0]
    lines += ["", f"All 4-bit: {format_ppl(r0['ppl_all_top'])}; unquantized: "
              f"{format_ppl(r0['ppl_original'])}; evaluation: {r0['eval']['tokens']:,} tokens of "
              f"{r0['eval']['description']}."]
    for r in report["results"]:
        lines.append(f"Levels {'/'.join(map(str, r['levels']))}: {r['samples']} SPQE samples, "
                     f"{r['seconds_per_sample']:.2f} s per sample.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(stderr=True)

    def log(event) -> None:
        if isinstance(event, events.Log):
            console.print(log_line(event))
        elif isinstance(event, events.SampleDone) and (event.index + 1) % 10 == 0:
            console.print(f"[dim]sample {event.index + 1}[/]")

    results = [one(args, tuple(int(x) for x in s.split(",")), log) for s in args.level_sets]
    device = pick_device(args.device)
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    report = {"command": "python bench/levels.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "hardware": hardware, "backend": args.backend, "group_size": args.group_size,
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "levels.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "levels.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
