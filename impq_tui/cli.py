"""The `impq-tui` command: the Textual app with no sub-command, headless sub-commands
(run, solve, eval) for batch jobs. User errors print one paragraph and exit 2."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_CANCELLED = 130


def _shown(text: str, limit: int = 40) -> str:
    """A value the user typed, quoted for a message, cut short when it is very long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


class Parser(argparse.ArgumentParser):
    """argparse, with every very long word of its messages cut short: `unrecognized
    arguments: ...` would otherwise echo a pasted megabyte back at the user."""

    def error(self, message: str):
        import re

        super().error(re.sub(r"\S{61,}", lambda m: m.group()[:60] + "...", message))


def _bits(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number of bits (e.g. 2.5)") from None
    if not 2.0 <= value <= 4.0:
        raise argparse.ArgumentTypeError(f"{_shown(text)} bits is outside [2, 4]: choose an average "
                                         "precision between 2 (all 2-bit) and 4 (all 4-bit)")
    return value


def _whole(text: str) -> int:
    """int(), with an error that quotes at most the start of a very long value."""
    try:
        return int(text)
    except ValueError:      # also a number too long to convert (over 4300 digits)
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a whole number") from None


def _real(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number") from None


def _positive(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{_shown(text)} must be at least 1")
    return value


def _device(text: str) -> str:
    """cpu, cuda or cuda:N (checked here: torch.device() raises a bare RuntimeError on
    anything else, and that only once a model is about to be loaded)."""
    if text in ("", "auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cuda, cuda:N or cpu")


MAX_SAMPLES = 1_000_000     # each sample is L+1 evaluations: far beyond any real run
MAX_SEED = 2**63 - 1        # numpy and torch generators take 0 ... 2**63-1 everywhere


def check_text_early(spec: str | None, option: str) -> None:
    """Read a local text file now, so a missing, empty or undecodable file is reported
    before minutes of model loading (the hub corpora need the network: checked later)."""
    from core.data import TEXT_CHOICES, load_text
    from core.errors import UserError

    if spec is None or spec in TEXT_CHOICES:
        return
    try:
        load_text(spec, "calibration")
    except UserError as exc:
        raise UserError(f"{option}: {exc}") from None


def check_window_tokens(value: int | None, option: str) -> None:
    from core.errors import UserError

    if value is not None and value < 2:
        raise UserError(f"{option} must be at least 2 (got {value}): a window needs one token "
                        "to predict from and one to predict.")


MAX_BUDGET_BYTES = 10**18   # an exabyte: beyond any model's weights (and a sane file name)


def _budget_bytes(text: str) -> int:
    value = _positive(text)
    if value > MAX_BUDGET_BYTES:
        raise argparse.ArgumentTypeError(f"{_shown(text)} bytes is more than 10**18 (an "
                                         "exabyte): give the memory budget in bytes, e.g. 150000000")
    return value


def _budget_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--bits", type=_bits, help="target average bits per weight, 2.0 to 4.0")
    group.add_argument("--budget-bytes", type=_budget_bytes,
                       help="memory budget for the decoder layers' quantized weights, in bytes")
    p.add_argument("--alpha", type=_real, default=0.5,
                   help="shrinkage of the covariance toward its diagonal (default 0.5)")
    add_local_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def add_local_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local", action="store_true",
                   help="IMPQ-local, our extension: weight each marginal by how close its step "
                        "is to the budget's number of 2-bit layers (README, Quality)")


def method_name(args) -> str:
    return "impq-local" if getattr(args, "local", False) else "impq"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="impq-tui",
        description="Interaction-aware mixed-precision quantization (SPQE + IMPQ). With no "
                    "sub-command, opens the terminal app.")
    parser.add_argument("--run", metavar="DIR", help="open this run directory in the app (follows a run in progress)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="estimate Shapley values with SPQE into a run directory")
    run.add_argument("--model", help="hub id, checkpoint directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    run.add_argument("--calib-text", help="builtin, wikitext2, c4 or a .txt/.jsonl/.parquet path (default builtin)")
    run.add_argument("--backend", choices=("quanto", "hqq"), help="quantization backend (default quanto)")
    run.add_argument("--group-size", type=_positive, help="quantization group size (default 64)")
    run.add_argument("--samples", type=_whole, help="SPQE samples M (default 100)")
    run.add_argument("--windows", type=_positive, help="calibration windows N (default 8 on CPU, 16 on GPU)")
    run.add_argument("--window-tokens", type=_whole, help="tokens per window T (default 128 on CPU, 2048 on GPU)")
    run.add_argument("--seed", type=_whole, help="seed of permutations and window choice (default 0)")
    run.add_argument("--antithetic", action="store_true", default=None,
                     help="pair each permutation with its reverse")
    run.add_argument("--device", type=_device, help="cuda, cuda:N or cpu (default: cuda when present)")
    run.add_argument("--micro-batch", type=_positive, help="windows per forward pass")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the decoder layers (about 20%% faster on a GPU after a "
                          "minute of compiling)")
    run.add_argument("--gpus", type=_positive, default=1,
                     help="spread samples over N GPUs of this host, one process each (under "
                          "torchrun, one process per rank instead)")
    run.add_argument("--run-dir", help="where to write the run (default runs/<model>-<time>)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    run.add_argument("--quiet", action="store_true", help="no progress display")

    solve = sub.add_parser("solve", help="the optimal allocation of a run at a budget (SCIP)")
    solve.add_argument("run_dir", metavar="DIR")
    _budget_args(solve)

    ev = sub.add_parser("eval", help="perplexity of a run's allocation with the real backend")
    ev.add_argument("run_dir", metavar="DIR")
    _budget_args(ev)
    ev.add_argument("--eval-text", default="builtin", help="builtin, wikitext2, c4 or a path (default builtin)")
    ev.add_argument("--eval-windows", type=_positive, help="evaluation windows (default 16)")
    ev.add_argument("--eval-window-tokens", type=_whole, help="tokens per evaluation window")
    ev.add_argument("--backend", choices=("quanto", "hqq"), help="backend for the real model (default: the run's)")
    ev.add_argument("--device", type=_device, help="cuda, cuda:N or cpu (default: the run's)")

    from impq_tui.cli_compare import add_compare_parser
    from impq_tui.cli_export import add_export_parser

    add_compare_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        return run_reporting_errors(_app, args)
    from impq_tui.cli_compare import cmd_compare
    from impq_tui.cli_export import cmd_export

    commands = {"run": cmd_run, "solve": cmd_solve, "eval": cmd_eval, "compare": cmd_compare,
                "export": cmd_export}
    return run_reporting_errors(commands[args.command], args)


def run_reporting_errors(command, args) -> int:
    """Run a sub-command: a user error is one paragraph and exit 2, an interrupt exit 130."""
    from core.errors import UserError

    _quiet_libraries()
    try:
        return command(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"impq-tui: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("impq-tui: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _app(args) -> int:
    from impq_tui.app import run_app

    return run_app(run_dir=args.run)


# ------------------------------------------------------------------------------ run

def _config_from_args(args):
    from core.engine import device_defaults
    from core.models import pick_device
    from core.runs import RunConfig

    device = pick_device(args.device)
    defaults = {**vars(RunConfig()), **device_defaults(device), "device": str(device)}
    given = {k: getattr(args, k) for k in ("model", "calib_text", "backend", "group_size", "samples",
                                           "windows", "window_tokens", "seed", "antithetic", "micro_batch", "compile")
             if getattr(args, k) is not None}
    return RunConfig(**{**{k: v for k, v in defaults.items() if k in RunConfig.__dataclass_fields__},
                        **given})


def _check_run_args(args) -> None:
    from core.errors import UserError

    for option, value in (("--run-dir", args.run_dir), ("--resume", args.resume)):
        if value is not None and not value.strip():    # e.g. an unset "$DIR"
            raise UserError(f"{option} is empty: name the run directory.")

    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples must be at least 1 (got {args.samples}): SPQE needs one or "
                        "more sampled permutations.")
    if args.samples is not None and args.samples > MAX_SAMPLES:
        raise UserError(f"--samples {args.samples} is more than {MAX_SAMPLES:,}: each sample "
                        "costs one evaluation per layer; a few hundred are plenty.")
    check_window_tokens(args.window_tokens, "--window-tokens")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must lie between 0 and 2**63-1 (got {args.seed}).")
    from core.distributed import torchrun_env

    if args.gpus > 1 and not torchrun_env():
        import torch

        if args.gpus > torch.cuda.device_count():
            raise UserError(f"--gpus {args.gpus} asks for more GPUs than the "
                            f"{torch.cuda.device_count()} visible here.")
    check_text_early(args.calib_text, "--calib-text")


def cmd_run(args) -> int:
    from dataclasses import replace

    from core.errors import UserError
    from core.models import EMBEDDED, EMBEDDED_NAME, pick_device
    from core.runs import RunConfig, RunDir, default_run_dir

    _check_run_args(args)
    from core.distributed import run_rank, torchrun_env

    rank = torchrun_env()
    if rank and rank[0] > 0:     # a torchrun worker: rank 0 owns the run directory
        run_rank(rank[0], rank[1], rank[2], None, None, lambda e: None, threading.Event())
        return 0
    created = False
    old_config = None       # config.json as it was, put back if a resume fails before any sample
    if args.resume:
        if args.run_dir:
            raise UserError("give either --resume DIR or --run-dir DIR, not both.")
        run = RunDir.open(args.resume)
        run.lock()
        try:
            overrides = {k: getattr(args, k) for k in (*RunConfig.IDENTITY, "samples", "micro_batch", "compile")
                         if getattr(args, k, None) is not None}
            if args.device:
                overrides["device"] = str(pick_device(args.device))
            old_config = (run.path / "config.json").read_bytes()
            samples_before = len(run.samples())
            config = replace(run.config, **overrides)
            run.update_config(config)   # refuses a change to what decides the vectors
        except BaseException:
            run.unlock()                # (in-process callers, e.g. tests, open the run again)
            raise
    else:
        config = _config_from_args(args)
        name = EMBEDDED_NAME if config.model == EMBEDDED else Path(config.model.rstrip("/")).name.removesuffix(".gguf")
        path = Path(args.run_dir) if args.run_dir else default_run_dir(name.replace("/", "--"))
        try:
            run = RunDir.create(path, config)
        except OSError as exc:          # a --run-dir below a file, unwritable, too long...
            raise UserError(f"cannot create the run directory {str(path)!r}: "
                            f"{exc.strerror or exc}. Choose another --run-dir.") from None
        created = True

    cancel = threading.Event()
    _on_signals(cancel)
    try:
        status = _run_with_display(config, run, cancel, quiet=args.quiet, engine=_engine(args, rank))
    except BaseException:
        if created and not run.samples():
            run.unlock()
            shutil.rmtree(run.path, ignore_errors=True)   # nothing worth keeping: leave no half-made run
        elif old_config is not None:
            # A failed resume that added nothing leaves config.json as it found it (a new
            # --samples or --micro-batch only counts once the run goes on).
            from core.runs import write_atomic

            try:
                if len(run.samples()) == samples_before:
                    write_atomic(run.path / "config.json", old_config.decode())
            except Exception:   # never hide the error that stopped the run
                pass
        raise
    print(f"run directory: {run.path}  ({len(run.samples())} samples)")
    if status == "cancelled":
        print(f"stopped; continue with: impq-tui run --resume {run.path}", file=sys.stderr)
        return EXIT_CANCELLED
    return 0


def _on_signals(cancel: threading.Event) -> None:
    """SIGINT, SIGTERM and SIGHUP (a dropped SSH session) stop between evaluations; the
    sample in flight is dropped and everything finished stays on disk. A second signal
    interrupts at once."""
    def handler(_signum, _frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _engine(args, rank):
    """The single-process engine, or the multi-GPU one (--gpus N, or torchrun's rank 0)."""
    from core.distributed import run_multi_gpu, run_rank
    from core.engine import run_spqe

    if rank:
        return lambda config, run, callback, cancel: run_rank(0, rank[1], rank[2], config, run,
                                                              callback, cancel)
    if args.gpus > 1:
        return lambda config, run, callback, cancel: run_multi_gpu(config, run, callback, cancel,
                                                                   args.gpus)
    return run_spqe


def _run_with_display(config, run, cancel, quiet: bool, engine) -> str:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

    from core import events

    console = Console(stderr=True)
    if quiet:
        return engine(config, run, lambda e: None, cancel)
    columns = (SpinnerColumn(), TextColumn("sample {task.fields[sample]}"),
               TextColumn("step {task.fields[step]}"), BarColumn(),
               TextColumn("{task.fields[rate]} eval/s"), TextColumn("{task.fields[tps]} tok/s"),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[device]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("spqe", total=None, sample="-", step="-", rate="-", tps="-",
                                 device=config.device)

        def callback(event) -> None:
            if isinstance(event, events.Progress):
                progress.update(task, total=event.samples * event.steps,
                                completed=(event.sample - 1) * event.steps + event.step,
                                sample=f"{event.sample}/{event.samples}",
                                step=f"{event.step}/{event.steps}",
                                rate=f"{event.evals_per_s:.2f}", tps=f"{event.tokens_per_s:,.0f}",
                                device=event.device + (f" {event.gpu_mem_bytes / 2**30:.1f} GiB"
                                                       if event.gpu_mem_bytes else ""))
            elif isinstance(event, events.Log):
                progress.console.print(f"[dim]{event.message}[/]")
            elif isinstance(event, events.SampleDone):
                progress.console.print(f"sample {event.index} done: v(all 4-bit)={event.v_high:.4f} "
                                       f"v(all 2-bit)={event.v_low:.4f} nats/token")

        return engine(config, run, callback, cancel)


# ------------------------------------------------------------------------------ solve, eval

def cmd_solve(args) -> int:
    from core.evaluate import allocate
    from core.runs import RunDir

    run = RunDir.open(args.run_dir)
    alloc = allocate(run, bits=args.bits, budget=args.budget_bytes, alpha=args.alpha, local=args.local)
    record = {**alloc.to_json(), "method": method_name(args), "samples": len(run.samples()),
              "alpha": args.alpha, "run": str(run.path)}
    run.write_json(f"allocations/{_file_stem(args)}.json", record)
    if args.json:
        print(json.dumps(record))
    else:
        _print_allocation(run, alloc, args.alpha, args.local)
    return 0


def _file_stem(args) -> str:
    from core.evaluate import result_stem

    return result_stem(args.bits, args.budget_bytes, method_name(args))


def _print_allocation(run, alloc, alpha: float, local: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    from core.interactions import quadratic_model

    model = quadratic_model(run.D(), alpha=alpha, paired=run.config.antithetic)
    costs = run.costs()
    kind = "IMPQ-local" if local else "IMPQ"
    table = Table(title=f"{kind} allocation, {run.path} ({model.samples} samples); phi and se "
                        "are the Shapley estimates")
    for col in ("layer", "bits", "phi (nats)", "se", "bytes"):
        table.add_column(col, justify="right")
    for i, bits in enumerate(alloc.bits_per_layer):
        style = "bold green" if bits == 4 else "yellow"
        table.add_row(str(i), f"[{style}]{bits}[/]", f"{model.phi[i]:.5f}", f"{model.se[i]:.5f}",
                      f"{(costs.m_hi if bits == 4 else costs.m_lo)[i]:,}")
    console = Console()
    console.print(table)
    target = f"{alloc.target_bits:.2f} bits" if alloc.target_bits is not None else "byte budget"
    console.print(f"target {target}: budget {alloc.budget_bytes:,} B, used {alloc.bytes:,} B; "
                  f"effective {alloc.avg_bits:.3f} bits/weight with metadata "
                  f"({alloc.weight_bits:.3f} without); {sum(b == 4 for b in alloc.bits_per_layer)} "
                  f"of {len(alloc.bits_per_layer)} layers at 4 bits")
    console.print(f"predicted loss increase over all-4-bit: {alloc.predicted_delta_nll:.5f} nats/token; "
                  f"SCIP {alloc.status} in {alloc.seconds * 1000:.0f} ms")


def cmd_eval(args) -> int:
    from core.evaluate import allocate, evaluate_allocation
    from core.runs import RunDir

    check_window_tokens(args.eval_window_tokens, "--eval-window-tokens")
    run = RunDir.open(args.run_dir)
    alloc = allocate(run, bits=args.bits, budget=args.budget_bytes, alpha=args.alpha, local=args.local)
    check_text_early(args.eval_text, "--eval-text")
    result = evaluate_allocation(run, list(alloc.bits_per_layer), eval_text=args.eval_text,
                                 windows=args.eval_windows, window_tokens=args.eval_window_tokens,
                                 backend=args.backend, device=args.device)
    record = {**result.to_json(), "method": method_name(args), "allocation": alloc.to_json(),
              "run": str(run.path)}
    run.write_json(f"evals/{_file_stem(args)}-{result.backend}.json", record)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{result.backend} at {alloc.avg_bits:.3f} effective bits ({alloc.weight_bits:.2f} "
              f"nominal): perplexity {result.ppl:.3f} (real modules), {result.ppl_simulated:.3f} "
              f"(simulated); unquantized {result.ppl_original:.3f}; {result.eval_tokens:,} tokens "
              f"of {result.eval_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
