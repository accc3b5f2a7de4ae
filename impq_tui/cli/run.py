"""`impq-tui run`: SPQE into a run directory, with a rich progress display; `--resume DIR`
continues a run, `--gpus N` or torchrun spreads the samples over GPUs."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path

from core.errors import EXIT_CANCELLED
from impq_tui.cli.args import (
    FLAGS,
    RUN_BACKENDS,
    add_gguf_types,
    bits,
    device,
    gguf_types,
    whole,
)


def add_parser(sub) -> None:
    run = sub.add_parser("run", help="estimate Shapley values with SPQE into a run directory")
    run.add_argument("--model", help="hub id, checkpoint directory or .gguf (default: embedded SmolLM2-135M-Instruct)")
    run.add_argument("--calib-text", help="builtin, wikitext2, c4 or a .txt/.jsonl/.parquet path (default builtin)")
    run.add_argument("--backend", choices=RUN_BACKENDS,
                     help="quantization backend (default quanto); gguf needs the gguf extra")
    add_gguf_types(run)
    run.add_argument("--levels", type=whole, nargs="+", metavar="BITS",
                     help="precisions each layer steps down through, e.g. 2 3 4 (default 2 4, the "
                          "paper's; quanto 2/4/8, hqq 2/3/4/8); a sample costs layers x "
                          "(levels - 1) + 1 evaluations")
    run.add_argument("--group-size", type=whole, help="quantization group size (default 64)")
    run.add_argument("--samples", type=whole, help="SPQE samples M (default 10 on CPU, 100 on GPU)")
    run.add_argument("--windows", type=whole, help="calibration windows N (default 8 on CPU; on a GPU 4 for quanto and hqq, 16 for gptq and gguf)")
    run.add_argument("--window-tokens", type=whole, help="tokens per window T (default 128 on CPU, 2048 on GPU)")
    run.add_argument("--seed", type=whole, help="seed of permutations and window choice (default 0)")
    run.add_argument("--antithetic", action="store_true", default=None,
                     help="pair each permutation with its reverse")
    run.add_argument("--device", type=device, help="cuda, cuda:N or cpu (default: cuda when present)")
    run.add_argument("--micro-batch", type=whole, help="windows per forward pass")
    run.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the decoder layers (about 20%% faster on a GPU after a "
                          "minute of compiling)")
    run.add_argument("--until-settled", action=argparse.BooleanOptionalAction, default=None,
                     help="stop before --samples once the allocations at the --settle-bits "
                          "budgets have settled (README, Early stop); --no-until-settled runs "
                          "all samples")
    run.add_argument("--settle-bits", type=bits, nargs="+", metavar="BITS",
                     help="budgets --until-settled watches (default 2.5 3.0 3.5); implies it")
    run.add_argument("--gpus", type=whole, default=1,
                     help="spread samples over N GPUs of this host, one process each (under "
                          "torchrun, one process per rank instead)")
    run.add_argument("--gpu-memory", type=memory_size, metavar="SIZE",
                     help="GPU memory to use at most, per GPU, like accelerate's max_memory: 40 "
                          "(GiB), 40GiB or 42GB. The memory plan keeps within it (streaming the "
                          "layers that do not fit from host memory) and PyTorch's allocator is "
                          "held to it (default: what is free; also IMPQ_TUI_GPU_MEMORY)")
    run.add_argument("--run-dir", help="where to write the run (default runs/<model>-<time>)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR")
    run.add_argument("--quiet", action="store_true", help="no progress display")


def memory_size(text: str) -> str:
    """A size core.engine.parse_memory reads, checked at parse time."""
    from core.engine import parse_memory
    from core.errors import UserError

    try:
        parse_memory(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def request(args):
    from core.requests import RunRequest

    return RunRequest(model=args.model, calib_text=args.calib_text, backend=args.backend,
                      gguf_types=gguf_types(args),
                      levels=tuple(args.levels) if args.levels else None,
                      group_size=args.group_size, samples=args.samples, windows=args.windows,
                      window_tokens=args.window_tokens, seed=args.seed, antithetic=args.antithetic,
                      device=args.device, micro_batch=args.micro_batch, compile=args.compile,
                      until_settled=_until_settled(args), gpus=args.gpus, run_dir=args.run_dir, resume=args.resume)


def _until_settled(args) -> tuple[float, ...] | None:
    """The budgets to settle, () for off, None to keep the run's own choice (`resume`)."""
    from core.settle import DEFAULT_BITS

    if args.until_settled is False:
        return ()
    if args.settle_bits or args.until_settled:
        return tuple(args.settle_bits or DEFAULT_BITS)
    return None


def _new_config(req):
    """The RunConfig of a new run: the request's values over the device's defaults."""
    from core.models import pick_device
    from core.runs import RunConfig
    from core.settings import device_defaults

    dev = pick_device(req.device)
    defaults = {**vars(RunConfig()), **device_defaults(dev, req.backend or RunConfig.backend),
                "device": str(dev)}
    return RunConfig(**{**{k: v for k, v in defaults.items() if k in RunConfig.__dataclass_fields__},
                        **req.config_values()})


def command(args) -> int:
    from dataclasses import replace

    from core.errors import InvalidField, UserError
    from core.models import EMBEDDED, EMBEDDED_NAME, pick_device
    from core.runs import RunDir, default_run_dir

    req = request(args)
    req.validate()
    if getattr(args, "gpu_memory", None):   # in the environment: --gpus N workers read it too
        from core.engine import GPU_MEMORY_ENV

        os.environ[GPU_MEMORY_ENV] = args.gpu_memory
    from core.distributed import run_rank, torchrun_env

    rank = torchrun_env()
    if rank and rank[0] > 0:     # a torchrun worker: rank 0 owns the run directory
        run_rank(rank[0], rank[1], rank[2], None, None, lambda e: None, threading.Event())
        return 0
    created = False
    old_config = None       # config.json as it was, put back if a resume fails before any sample
    if req.resume:
        run = RunDir.open(req.resume)
        run.lock()
        try:
            overrides = req.config_values()
            if req.device:
                overrides["device"] = str(pick_device(req.device))
            old_config = (run.path / "config.json").read_bytes()
            samples_before = len(run.samples())
            if req.samples is not None and req.samples < samples_before:
                raise InvalidField("samples", f"is {req.samples}, fewer than the {samples_before} "
                                              "samples the run already has: ask for more, or "
                                              "leave it out to finish the run's own count.")
            config = replace(run.config, **overrides)
            run.update_config(config)   # refuses a change to what decides the vectors
        except BaseException:
            run.unlock()                # (in-process callers, e.g. tests, open the run again)
            raise
    else:
        config = _new_config(req)
        name = EMBEDDED_NAME if config.model == EMBEDDED else Path(config.model.rstrip("/")).name.removesuffix(".gguf")
        path = Path(req.run_dir) if req.run_dir else default_run_dir(name.replace("/", "--"))
        try:
            run = RunDir.create(path, config)
        except OSError as exc:          # a --run-dir below a file, unwritable, too long...
            raise UserError(f"cannot create the run directory {str(path)!r}: "
                            f"{exc.strerror or exc}. Choose another --run-dir.") from None
        created = True
        config = run.config             # the model and text as resolved paths

    cancel, pause, sampling = threading.Event(), threading.Event(), threading.Event()
    on_signals(cancel, sampling)
    if not rank and req.gpus == 1:      # SIGUSR1/SIGUSR2 pause and continue (core.control)
        from core.control import install_run_controls

        install_run_controls(cancel, pause, run.path)
    try:
        status = _run_with_display(config, run, cancel, quiet=args.quiet,
                                   engine=_marking(_engine(req.gpus, rank, pause), sampling))
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
        print(f"stopped; continue with: impq-tui run --resume {shlex.quote(str(run.path))}",
              file=sys.stderr)
        return EXIT_CANCELLED
    return 0


def on_signals(cancel: threading.Event, sampling: threading.Event | None = None) -> None:
    """SIGINT, SIGTERM and SIGHUP (a dropped SSH session) stop between evaluations; the
    sample in flight is dropped and everything finished stays on disk. A second signal,
    or the first while the model still loads (`sampling` not yet set: nothing to lose),
    interrupts at once."""
    def handler(_signum, _frame):
        if cancel.is_set() or (sampling is not None and not sampling.is_set()):
            cancel.set()
            raise KeyboardInterrupt
        cancel.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _console_quiet_on_close(on_close):
    """rich's Console on stderr, turning quiet on a closed pipe instead of exiting (rich
    raises SystemExit(1) there, which would stop the run)."""
    from rich.console import Console

    class QuietOnClose(Console):
        def on_broken_pipe(self) -> None:
            import os

            if not self.quiet:
                on_close()
            self.quiet = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(devnull, fd)
    return QuietOnClose(stderr=True)


def _surviving_a_closed_output(callback, run):
    """The display callback, made harmless when the terminal or pipe it writes to goes away
    (`impq-tui run ... 2>&1 | head -1`): the output goes to /dev/null from then on and the
    run goes on, noting why in events.log."""
    import os

    def guarded(event) -> None:
        try:
            callback(event)
        except OSError as exc:      # BrokenPipeError, EIO from a closed terminal
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in (1, 2):
                os.dup2(devnull, fd)
            run.log(f"output closed ({exc.strerror or exc}): the run goes on without a display")
    return guarded


def _marking(engine, sampling: threading.Event):
    """The engine, setting `sampling` once it evaluates (preparation is over)."""
    from core import events

    def run(config, run_dir, callback, cancel):
        def marked(event) -> None:
            if isinstance(event, events.Progress):
                sampling.set()
            callback(event)
        return engine(config, run_dir, marked, cancel)
    return run


def _engine(gpus: int, rank, pause: threading.Event):
    """The single-process engine, or the multi-GPU one (--gpus N, or torchrun's rank 0)."""
    from core.distributed import run_multi_gpu, run_rank
    from core.engine import run_spqe

    if rank:
        return lambda config, run, callback, cancel: run_rank(0, rank[1], rank[2], config, run,
                                                              callback, cancel)
    if gpus > 1:
        return lambda config, run, callback, cancel: run_multi_gpu(config, run, callback, cancel, gpus)
    return lambda config, run, callback, cancel: run_spqe(config, run, callback, cancel, pause)


def _run_with_display(config, run, cancel, quiet: bool, engine) -> str:
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    from core import events
    from impq_tui.report import log_line

    console = _console_quiet_on_close(
        lambda: run.log("output closed (broken pipe): the run goes on without a display"))
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
                progress.console.print(log_line(event, FLAGS))
            elif isinstance(event, events.SampleDone):
                progress.console.print(f"sample {event.index + 1} done: v(all 4-bit)={event.v_high:.4f} "
                                       f"v(all 2-bit)={event.v_low:.4f} nats/token")

        return engine(config, run, _surviving_a_closed_output(callback, run), cancel)
