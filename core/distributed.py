"""SPQE over several GPUs: one process per GPU, samples split between them.

Samples are independent and permutation m depends only on (seed, m), so each rank
evaluates its share of the sample indices on its own full copy of the model; every
round the finished vectors are gathered to rank 0, the run directory's one writer,
which appends them in index order. The vectors are the ones a single GPU computes.

    run_multi_gpu(config, run, callback, cancel, gpus)   # `impq-tui run --gpus N`, one host
    run_rank(...)                                        # one rank; also under torchrun

Under torchrun on hosts without CUDA the ranks talk over gloo and compute on the CPU
(how the tests check the torchrun path on a CI machine).
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core import events, settle
from core.engine import (
    _finish,
    _Meter,
    check_fingerprint,
    costs_record,
    ensure_model_files,
    handle_nonfinite,
    prepare,
    save_costs,
    warner,
    write_status,
)
from core.errors import InvalidField, UserError
from core.runs import RunConfig, RunDir
from core.spqe import Sampler
from core.switching import PrefixEvaluator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_multi_gpu(config: RunConfig, run: RunDir, callback: events.Callback,
                  cancel: threading.Event, gpus: int) -> str:
    """Rank 0 runs in this process (it holds the run's lock and writes); ranks 1..N-1 are
    spawned, one per GPU."""
    available = torch.cuda.device_count()
    if gpus > available:
        raise InvalidField("gpus", f"{gpus} asks for more GPUs than the {available} visible here.")
    ensure_model_files(config)
    init = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_spawned_rank, args=(rank, gpus, config, init), daemon=True)
               for rank in range(1, gpus)]
    for w in workers:
        w.start()
    try:
        return run_rank(0, gpus, 0, config, run, callback, cancel, init)
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()


def _spawned_rank(rank: int, world: int, config: RunConfig, init: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent decides when to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    run_rank(rank, world, rank, config, None, events.ignore, threading.Event(), init)


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def run_rank(rank: int, world: int, local_rank: int, config: RunConfig | None, run: RunDir | None,
             callback: events.Callback, cancel: threading.Event, init: str = "env://") -> str:
    """One rank of a multi-GPU SPQE run. Rank 0 passes the run and config; the others
    receive them. Cancellation and the settle rule (`until_settled`) are decided by rank 0
    between rounds: each GPU finishes the sample in flight, and rank 0 writes it."""
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                                device_id=torch.device("cuda", local_rank))
    else:   # a host without CUDA (torchrun on CPUs): the same protocol over gloo
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        shared = [config, str(run.path) if run else None, None]
        if rank == 0:
            done = {r["m"] for r in run.samples()}
            shared[2] = [m for m in range(config.samples) if m not in done]
            ensure_model_files(config)
        dist.broadcast_object_list(shared, src=0)
        config, path, todo = shared
        config = replace(config, device=f"cuda:{local_rank}" if on_gpu else "cpu")
        prepared = prepare(config, callback if rank == 0 else events.ignore)
        if rank == 0:
            check_fingerprint(run, config, prepared.windows, callback)
            save_costs(run, costs_record(prepared))
        evaluator = PrefixEvaluator(prepared.loaded, prepared.windows, config.micro_batch,
                                    compile=config.compile, layer_scope=prepared.switch.unpacked,
                                    on_retry=warner(run, callback) if rank == 0 else None)
        meter = _Meter(callback, config, run, prepared.loaded.device, prepared.switch.L,
                       prepared.windows.numel(), config.samples - len(todo), parallel=world) \
            if rank == 0 else None
        sampler = Sampler(prepared.switch, evaluator, config.seed, config.antithetic,
                          on_eval=meter.on_eval if meter else None, levels=config.levels)
        # Rank 0 applies the settle rule to the samples in index order, as one process would;
        # the round in flight when it holds is kept (those samples are already paid for).
        settler = settle.Settler(run.costs(), settle.SettleRule(
            bits=settle.budgets_for(config.levels, config.until_settled)), config.antithetic) \
            if rank == 0 and config.until_settled else None
        settled = None
        sampler.start()
        for start in range(0, len(todo), world):
            round_ = todo[start:start + world]
            mine = round_[rank] if rank < len(round_) else None
            record = sampler.sample(mine).to_record() if mine is not None else None
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(record, gathered, dst=0)
            stop, error = [False, None, None], None
            if rank == 0:
                for rec in sorted((r for r in gathered if r), key=lambda r: r["m"]):
                    run.append_sample(rec)
                    callback(events.SampleDone(index=rec["m"], permutation=tuple(rec["perm"]),
                                               d=tuple(rec["d"]), v_high=rec["v_high"],
                                               v_low=rec["v_low"], finite="nonfinite" not in rec))
                    if "nonfinite" in rec and error is None:
                        try:   # the layer diagnosis runs on rank 0's model
                            handle_nonfinite(run, callback, rec, sampler.nonfinite_alone)
                        except UserError as exc:
                            error = exc
                    if settler is not None and settled is None and settler.observe(run.D()):
                        settled = settler.message()
                meter.sample += len(round_)
                stop = [cancel.is_set() or error is not None or settled is not None,
                        str(error) if error else None, settled]
            dist.broadcast_object_list(stop, src=0)
            if stop[1] is not None:       # every rank leaves; rank 0 reports it
                if rank == 0:
                    raise error
                return "failed"
            if stop[2] is not None:
                if rank > 0:
                    return "completed"
                callback(events.Log(settled))
                return _finish(run, callback, "completed",
                               f"completed (settled) on {world} {'GPUs' if on_gpu else 'CPU processes'} "
                               f"with {len(run.samples())} of {config.samples} samples; {settled}")
            if stop[0]:
                return _finish(run, callback, "cancelled", "cancelled after a round") if rank == 0 else "cancelled"
        return _finish(run, callback, "completed", f"completed on {world} {'GPUs' if on_gpu else 'CPU processes'}") if rank == 0 else "completed"
    except Exception as exc:
        if rank == 0:
            write_status(run, "failed", message=str(exc))
        raise
    finally:
        dist.destroy_process_group()
