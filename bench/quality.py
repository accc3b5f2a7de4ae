"""Does interaction-aware allocation win? IMPQ against the four isolated baselines on
the embedded SmolLM2-135M-Instruct, for HQQ and Quanto (issue 4), and GPTQ measured by
SPQE (`--backends gptq`, issue 16: GPTQModel's quantizer on Hessians of the unquantized
model; compare evaluates its real GPTQModel modules).

For each backend: SPQE into a run directory (core.engine.run_spqe; an existing one in
OUT/<backend> is continued), more samples while the allocations at the target budgets
still move, then core.compare (every method at every budget, the real backend's
modules, perplexity on evaluation text disjoint from the calibration text). Prints the
tables and writes OUT/quality.json, OUT/quality.md (tables for the README), and
OUT/quality.png/.svg.

How many samples: after M samples we solve the allocation at every target budget from
the first m = 1..M samples only. The estimates have settled when no allocation changed
during the last --stable samples; until then (and up to --max-samples) the run gets
more samples. The report gives, per budget, the sample after which its allocation
never changed again.

    python bench/quality.py                               # GPU: 100+ samples, 16 x 2048 tokens
    python bench/quality.py --samples 2 --max-samples 2 --windows 2 --window-tokens 64 \\
        --eval-windows 2 --eval-window-tokens 64 --device cpu   # a CPU smoke run
    python bench/quality.py --backends gptq --out runs/bench-quality-gptq   # GPTQ rows (GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core import events  # noqa: E402
from core.backends.gguf import parse_types  # noqa: E402
from core.compare import DEFAULT_BITS, LABELS, METHODS, CompareResult, compare, draw  # noqa: E402
from core.engine import run_spqe  # noqa: E402
from core.interactions import quadratic_model  # noqa: E402
from core.models import pick_device  # noqa: E402
from core.runs import CONFIG, RunConfig, RunDir  # noqa: E402
from core.settings import device_defaults  # noqa: E402
from core.solver import solve  # noqa: E402
from impq_tui.report import compare_report, format_ppl, log_line, markdown_table  # noqa: E402

# The bar: IMPQ perplexity at most this times the best baseline's.
BAR = {2.25: 0.8, 2.5: 0.8, 3.0: 1.0, 3.5: 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["hqq", "quanto"], choices=("hqq", "quanto", "gguf", "gptq"))
    p.add_argument("--gguf-types", default="Q2_K,Q4_K",
                   help="the gguf backend's low and high llama.cpp types (default Q2_K,Q4_K)")
    p.add_argument("--model", default="embedded")
    p.add_argument("--samples", type=int, default=100, help="SPQE samples to start with (default 100)")
    p.add_argument("--max-samples", type=int, help="most samples while not settled (default 3 x --samples)")
    p.add_argument("--stable", type=int, default=25,
                   help="samples the allocations must stay unchanged for (default 25)")
    p.add_argument("--bits", type=float, nargs="+", default=list(DEFAULT_BITS))
    p.add_argument("--calib-text", default="builtin")
    p.add_argument("--eval-text", default="builtin")
    p.add_argument("--windows", type=int, help="calibration windows (default 16 on GPU, 8 on CPU)")
    p.add_argument("--window-tokens", type=int, help="calibration window tokens (2048 GPU, 256 CPU)")
    p.add_argument("--eval-windows", type=int, help="evaluation windows (default: the compare default)")
    p.add_argument("--eval-window-tokens", type=int, help="evaluation window tokens (default: as calibration)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--antithetic", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-quality"))
    p.add_argument("--replot", action="store_true",
                   help="only redraw the figure and quality.md from OUT/quality.json")
    return p.parse_args(argv)


def run_config(args, backend: str) -> RunConfig:
    device = pick_device(args.device)
    d = device_defaults(device)
    return RunConfig(model=args.model, calib_text=args.calib_text, backend=backend,
                     group_size=args.group_size, samples=args.samples,
                     windows=args.windows or d["windows"],
                     window_tokens=args.window_tokens or d["window_tokens"], seed=args.seed,
                     antithetic=args.antithetic, device=str(device), dtype=d["dtype"],
                     micro_batch=d["micro_batch"],
                     gguf_types=",".join(parse_types(args.gguf_types)) if backend == "gguf" else "")


def open_run(path: Path, config: RunConfig) -> RunDir:
    """A new run, or the one already at `path` when its identity matches (continued)."""
    if (path / CONFIG).is_file():
        run = RunDir.open(path)
        run.update_config(config)   # refuses another identity (model, text, windows, ...)
        return run
    run = RunDir.create(path, config)
    run.unlock()
    return run


# ------------------------------------------------------------------ settling

def allocations_after(D: np.ndarray, costs, bits, alpha: float, paired: bool, m: int) -> dict:
    model = quadratic_model(D[:m], alpha=alpha, paired=paired)
    return {b: solve(model.a, model.K, costs, bits=b).bits_per_layer for b in bits}


def settling(run: RunDir, bits, alpha: float) -> dict:
    """Per budget, the sample count after which the allocation never changed again
    (scanning back from the last sample), and a coarse trajectory of how many layers
    differ from the final allocation after m samples."""
    D, costs, paired = run.D(), run.costs(), run.config.antithetic
    M = len(D)
    step = 2 if paired and M >= 2 else 1
    final = allocations_after(D, costs, bits, alpha, paired, M)
    settled = {b: step if M >= step else M for b in bits}
    open_budgets = set(bits)
    m = M - step
    while open_budgets and m >= step:
        now = allocations_after(D, costs, bits, alpha, paired, m)
        for b in list(open_budgets):
            if now[b] != final[b]:
                settled[b] = m + step
                open_budgets.discard(b)
        m -= step
    grid = sorted({m for m in np.unique(np.geomspace(step, M, num=min(M, 16)).round().astype(int))
                   if m >= step and m % step == 0} | {M})
    trajectory = []
    for m in grid:
        now = allocations_after(D, costs, bits, alpha, paired, m)
        trajectory.append({"samples": int(m), "layers_differing": {
            str(b): int(sum(x != y for x, y in zip(now[b], final[b]))) for b in bits}})
    model = quadratic_model(D, alpha=alpha, paired=paired)
    rel_se = model.se / np.maximum(np.abs(model.phi), 1e-12)
    return {"samples": M, "settled_at": {str(b): int(settled[b]) for b in bits},
            "settled_at_max": int(max(settled.values())),
            "unchanged_for": int(M - max(settled.values())),
            "median_rel_se": float(np.median(rel_se)), "max_se": float(model.se.max()),
            "trajectory": trajectory}


# ------------------------------------------------------------------ one backend

def run_backend(args, backend: str, console) -> dict:
    config = run_config(args, backend)
    run = open_run(Path(args.out) / backend, config)
    max_samples = args.max_samples or 3 * args.samples
    console.rule(f"{backend}: SPQE on {config.windows} x {config.window_tokens} tokens of "
                 f"{config.calib_text}, {config.device} ({config.dtype})")
    t0 = time.perf_counter()
    last = [time.perf_counter()]

    def callback(event) -> None:
        if isinstance(event, events.SampleDone):
            now = time.perf_counter()
            console.print(f"[dim]{backend} sample {event.index + 1}: v(all 4-bit) "
                          f"{event.v_high:.4f}, v(all 2-bit) {event.v_low:.4f} nats/token, "
                          f"{now - last[0]:.1f} s[/]")
            last[0] = now
        elif isinstance(event, events.Log):
            console.print(log_line(event))

    M = config.samples
    while True:
        config = replace(run.config, samples=M)
        run.update_config(config)
        status = run_spqe(config, run, callback)
        if status != "completed":
            raise SystemExit(f"SPQE {status} for {backend}")
        settle = settling(run, args.bits, args.alpha)
        console.print(f"{backend}: {settle['samples']} samples; allocations last changed at "
                      f"sample {settle['settled_at_max']} "
                      f"({', '.join(f'{b} bits: {m}' for b, m in settle['settled_at'].items())})")
        if settle["unchanged_for"] >= args.stable or M >= max_samples:
            break
        M = min(max_samples, settle["settled_at_max"] + args.stable)
        console.print(f"{backend}: not settled for {args.stable} samples yet: continuing to {M}")
    spqe_s = time.perf_counter() - t0

    def log(event) -> None:
        if isinstance(event, events.Log):
            console.print(log_line(event))

    result = compare(run, args.bits, eval_text=args.eval_text, windows=args.eval_windows,
                     window_tokens=args.eval_window_tokens or config.window_tokens,
                     alpha=args.alpha, callback=log)
    console.print(compare_report(result))
    sample_s = [r["seconds"] for r in run.samples()]
    return {"backend": backend, "run_dir": str(run.path), "config": run.config.to_json(),
            "settling": settle, "spqe_wall_s": spqe_s,
            "seconds_per_sample": float(np.mean(sample_s)) if sample_s else None,
            "compare": result.to_json(), "_result": result}


# ------------------------------------------------------------------ report

def verdicts(result: CompareResult, method: str = "impq") -> list[dict]:
    out = []
    for r in result.versus_best_baseline(method):
        bar = BAR.get(r["target_bits"])
        out.append({**r, "bar": bar, "meets_bar": None if bar is None else r["ratio"] <= bar})
    return out


def markdown(report: dict) -> str:
    lines = [f"Command: `{report['command']}`  ", f"Hardware: {report['hardware']['summary']}", ""]
    for b in report["backends"]:
        c, s = b["compare"], b["settling"]
        lines += [f"### {c['backend']} (group {c['group_size']}), IMPQ from {c['samples']} SPQE samples", "",
                  f"Calibration {c['calib']['windows']} x {c['calib']['window_tokens']} tokens of "
                  f"{c['calib']['text']}; evaluation {c['eval']['tokens']:,} tokens of "
                  f"{c['eval']['description']}, the same for every method. Allocations last changed "
                  f"at sample {s['settled_at_max']} of {s['samples']}. Perplexity (effective bits):", ""]
        bits = c["bits"]
        rows = {(r["method"], r["target_bits"]): r for r in c["results"]}
        table = []
        for m in METHODS:
            if (m, bits[0]) not in rows:     # a report from before IMPQ-local
                continue
            cells = [f"{format_ppl(rows[(m, x)]['ppl'])} ({rows[(m, x)]['avg_bits']:.2f})" for x in bits]
            table.append([f"**{LABELS[m]}**" if m == "impq" else LABELS[m], *cells])
        for label, key in (("IMPQ", "verdicts"), ("IMPQ-local", "verdicts_local"),
                           ("IMPQ-fit", "verdicts_fit")):
            if b.get(key):
                table.append([f"{label} / best baseline", *(
                    f"{v['ratio']:.3f}" + ("" if v["bar"] is None else
                                           f" {'✓' if v['meets_bar'] else '✗'} (bar {v['bar']})")
                    for v in b[key])])
        lines += markdown_table(["method", *(f"{x:g} bits" for x in bits)], table)
        low, high = rows[("uniform-2", 2.0)], rows[("uniform-4", 4.0)]
        lines += ["", f"All 2-bit: {format_ppl(low['ppl'])} ({low['avg_bits']:.2f} bits); all 4-bit: "
                      f"{format_ppl(high['ppl'])} ({high['avg_bits']:.2f} bits); unquantized: "
                      f"{format_ppl(c['ppl_original'])}.", ""]
    return "\n".join(lines)


def hardware() -> dict:
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else None
    cpu = platform.processor() or platform.machine()
    summary = f"{gpu} (torch {torch.__version__}, CUDA {torch.version.cuda})" if cuda else \
        f"CPU only, {os.cpu_count()} cores ({cpu}), torch {torch.__version__}"
    return {"gpu": gpu, "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "summary": summary}


def write_figure(results: list[CompareResult], stem: Path) -> list[Path]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(results), 4.8), layout="constrained")
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results):
        draw(ax, result)
        ax.set_title(f"{result.model}, {result.backend} (group {result.group_size}), "
                     f"IMPQ from {result.samples} samples", fontsize="medium")
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def write_report(report: dict, results: list[CompareResult], out: Path, console) -> None:
    """quality.json and quality.md, and the figure where matplotlib is installed (a bare
    GPU box may lack it: `--replot` draws it later from quality.json)."""
    try:
        figure = write_figure(results, out / "quality")
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no figure; draw it later with "
                      f"`python bench/quality.py --replot --out {out}`[/]")
        figure = []
    report["files"] = [str(out / "quality.json"), str(out / "quality.md"), *map(str, figure)]
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(report) + "\n")


def replot(out: Path, console) -> int:
    """Redraw quality.png/.svg and quality.md from OUT/quality.json (no model, no GPU)."""
    path = out / "quality.json"
    if not path.is_file():
        console.print(f"[red]{path} does not exist: run the benchmark first.[/]")
        return 2
    report = json.loads(path.read_text())
    results = [CompareResult.from_json(b["compare"]) for b in report["backends"]]
    write_report(report, results, out, console)
    for f in report["files"]:
        console.print(f"wrote {f}")
    return 0


def main(argv=None) -> int:
    from rich.console import Console

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args = parse_args(argv)
    console = Console()
    out = Path(args.out)
    if args.replot:
        return replot(out, console)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/quality.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    backends, results = [], []
    for name in args.backends:      # the report is rewritten after each backend: a run cut
        b = run_backend(args, name, console)   # short keeps what it finished
        results.append(b.pop("_result"))
        b["verdicts"] = verdicts(results[-1])
        b["verdicts_local"] = verdicts(results[-1], "impq-local")
        b["verdicts_fit"] = verdicts(results[-1], "impq-fit")
        backends.append(b)
        report = {"command": command, "hardware": hardware(), "wall_s": time.perf_counter() - t0,
                  "bar": {str(k): v for k, v in BAR.items()}, "backends": backends}
        write_report(report, results, out, console)
    console.rule("summary")
    for b in backends:
        s = b["settling"]
        console.print(f"{b['backend']}: {s['samples']} SPQE samples ({b['seconds_per_sample']:.1f} s "
                      f"each); the allocations at every budget were unchanged for the last "
                      f"{s['unchanged_for']} samples (median se/|phi| {s['median_rel_se']:.2f})")
        for label, v in [("IMPQ", v) for v in b["verdicts"]] + \
                [("IMPQ-local", v) for v in b.get("verdicts_local", [])] + \
                [("IMPQ-fit", v) for v in b.get("verdicts_fit", [])]:
            mark = ("" if v["bar"] is None else
                    f", {'meets' if v['meets_bar'] else 'misses'} the bar of {v['bar']}")
            console.print(f"  {v['target_bits']:g} bits: {label} {v['impq_ppl']:.3f} vs best baseline "
                          f"{LABELS[v['best_baseline']]} {v['best_baseline_ppl']:.3f}: ratio "
                          f"{v['ratio']:.3f}{mark}")
    console.print(f"hardware: {report['hardware']['summary']}; {report['wall_s']:.0f} s in all")
    for f in report["files"]:
        console.print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
