"""Running SPQE into a run directory: the one entry point the CLI and the app share.

    run_spqe(config, run, callback, cancel, pause)

loads the model, the calibration windows and the backend, quantizes every layer once
per precision, measures its bytes, then walks SPQE samples, appending each finished
one to the run directory and reporting through `callback` (core.events). It checks
`cancel` and `pause` between evaluations. User errors raise UserError after a Failed
event; the caller decides how to show them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from core import events, fingerprint, settle
from core.backends import backend_for
from core.data import load_text, token_windows
from core.errors import InvalidField, UserError
from core.layerwise import host_available
from core.models import (
    EMBEDDED,
    LoadedModel,
    embedded_checkpoint,
    linear_shapes,
    load_model,
    parameter_counts,
    pick_device,
)
from core.runs import COSTS, STATUS, RunConfig, RunDir, overwrite_in_place
from core.settings import DTYPES
from core.spqe import Cancelled, Sampler
from core.switching import LayerSwitch, PrefixEvaluator


@dataclass
class Prepared:
    """What SPQE and later steps need: model, windows, backend, both quantized versions."""
    loaded: LoadedModel
    windows: torch.Tensor
    backend: object
    switch: LayerSwitch


def ensure_model_files(config: RunConfig) -> None:
    """Convert the embedded model once, before several processes would race to."""
    if config.model in (None, "", EMBEDDED):
        embedded_checkpoint()


GPU_MEMORY_ENV = "IMPQ_TUI_GPU_MEMORY"    # `run --gpu-memory`: the most GPU memory to plan for


@dataclass(frozen=True)
class MemoryPlan:
    """Where SPQE's weights live, decided from the config before any weight is read.

    dequantized: one full-precision copy of the decoder layers per level (the fastest:
      a plain matmul per linear).
    packed: the backend's quantized modules themselves, de-quantized on every use (what
      a 70B-class model needs: 2- and 4-bit copies take about 7/16 of one bf16 copy).
    by_layer: the full-precision model does not fit the GPU (or the host) at once, so it is
      built and quantized one decoder layer at a time (core.layerwise).
    streamed: with packed modules, how many layers (the first ones) keep theirs in host
      memory, copied to the GPU for each pass over the layer, because not all fit the GPU;
      host_bytes is what they take there."""
    packed: bool
    by_layer: bool
    summary: str
    streamed: int = 0
    host_bytes: int = 0


def parse_memory(text: str) -> int:
    """Bytes in a size as accelerate's max_memory writes it ("40GiB", "40GB", "512MiB"); a
    bare number is GiB."""
    units = {"": 2 ** 30, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40,
             "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}
    value = str(text).strip()
    number = value.rstrip("KMGTiBkmgtib ").strip()
    unit = value[len(number):].strip().upper()
    try:
        size = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"{text!r} is not a memory size: write e.g. 40 (GiB), 40GiB or 42GB.") from None
    if size <= 0:
        raise UserError(f"the GPU memory cap must be positive, not {text!r}.")
    return int(size)


def gpu_memory_cap() -> int | None:
    """The cap `run --gpu-memory` (or IMPQ_TUI_GPU_MEMORY) sets on GPU memory, in bytes."""
    value = os.environ.get(GPU_MEMORY_ENV, "").strip()
    return parse_memory(value) if value else None


def _packed_bytes(linear: int, bits: int, group: int, item: int) -> int:
    """About what a backend stores for `linear` weights at `bits`: the integers plus a scale
    and a zero point per group in the compute dtype (8 bits: one scale per row)."""
    extra = 0 if bits >= 8 else 2 * item / group
    return int(linear * (bits / 8 + extra))


def plan_memory(config: RunConfig, device: torch.device, backend, free: int | None = None,
                host: int | None = None, cap: int | None = None) -> MemoryPlan:
    """Fail before loading when no plan fits the GPU's free memory (and the host's, for the
    layers streamed from it); say which fits. `free` and `host` (bytes) default to what the
    GPU and the host have free now; `cap` (bytes) limits what is planned on the GPU."""
    sizes = parameter_counts(config.model)
    if sizes is None:
        return MemoryPlan(False, False, "memory plan: the model's size is unknown before loading")
    total, linear, cfg = sizes
    gib = 2 ** 30
    L = cfg.num_hidden_layers
    item = torch.empty((), dtype=DTYPES[config.dtype]).element_size()
    tokens = config.windows * config.window_tokens
    micro_tokens = min(config.micro_batch, config.windows) * config.window_tokens
    cache = L * tokens * cfg.hidden_size * item
    work = micro_tokens * (4 * cfg.intermediate_size + 8 * cfg.hidden_size) * item + (1 << 28) * 4
    if hasattr(backend, "calibrate"):     # one layer's float32 Hessians, two copies of the inputs
        work += 4 * (3 * cfg.hidden_size ** 2 + cfg.intermediate_size ** 2) \
            + 2 * tokens * cfg.hidden_size * item
    rest = (total - linear) * item                    # embeddings, head, norms
    one_layer = linear // L * item
    copies = len(config.levels) * linear * item
    packed = sum(_packed_bytes(linear, b, config.group_size, item) for b in config.levels)
    if free is None:
        free, _ = torch.cuda.mem_get_info(device)
    capped = cap is not None and cap < free
    free = min(free, cap) if cap is not None else free
    host = host_available() if host is None else host
    whole = total * item
    by_layer = whole > 0.9 * free or (host is not None and whole > 0.8 * host)
    fixed = rest + cache + work
    levels = "- and ".join(map(str, config.levels))
    parts = (f"{rest / gib:.1f} GiB embeddings and head, {cache / gib:.1f} GiB cached hidden "
             f"states of {tokens:,} calibration tokens")
    of_free = f"{free / gib:.1f} GiB free" + (f" (capped by {GPU_MEMORY_ENV} / --gpu-memory)"
                                              if capped else "")
    if fixed + copies <= free and not by_layer:
        return MemoryPlan(False, False, f"memory plan: de-quantized {levels}-bit copies of the "
                          f"decoder layers ({copies / gib:.1f} GiB) + {parts}, of "
                          f"{of_free} on {device}")
    if by_layer and hasattr(backend, "calibrate") and fixed + one_layer <= free:
        raise UserError(   # gguf imatrix, GPTQ Hessians
            f"{config.model} does not fit {device} whole ({whole / gib:.1f} GiB), and the "
            f"{config.backend} backend calibrates on the whole model; use hqq or quanto.")
    where = ("built and quantized one decoder layer at a time (the whole model, "
             f"{whole / gib:.1f} GiB, fits neither the GPU nor the host at once)"
             if by_layer else "loaded whole")
    if fixed + packed + one_layer <= free:
        return MemoryPlan(True, by_layer, (
            f"memory plan: packed {levels}-bit modules on {device}, de-quantized on use "
            f"({packed / gib:.1f} GiB; de-quantized copies would need {copies / gib:.1f}) + "
            f"{parts}, of {of_free}; {where}"))
    # Streaming: the first layers' packed modules in host memory (the prefix evaluator passes
    # over layer j in the evaluations that start at or before it, so the last layers are the
    # most used: they stay). A pass holds the layer's copy, the next streamed one's
    # (prefetched) and the layer de-quantized.
    per_layer = packed / L
    in_flight = 2 * _packed_bytes(linear // L, max(config.levels), config.group_size, item)
    resident = min(L - 1, int((free - fixed - one_layer - in_flight) // per_layer))
    if resident >= 0:
        streamed = L - resident
        host_bytes = int(streamed * per_layer)
        if host is not None and host_bytes > 0.8 * host:
            raise UserError(
                f"SPQE on this model needs {host_bytes / gib:.1f} GiB of host memory for the "
                f"packed {levels}-bit modules of the {streamed} of {L} layers that do not fit "
                f"{device} ({resident} layers' modules, {resident * per_layer / gib:.1f} GiB, fit "
                f"beside {parts} and {(one_layer + in_flight) / gib:.1f} GiB for the layer in "
                f"hand, of {of_free}), but the host has {host / gib:.1f} GiB available and at "
                "most 80% of it is used. Free host memory, use fewer calibration tokens "
                "(`windows`, `window_tokens`) or a GPU with more memory.")
        kind = "" if device.type != "cuda" else "pinned "
        avail = f" of {host / gib:.1f} GiB available" if host is not None else \
            " (the host's available memory is unknown)"
        return MemoryPlan(True, True, (
            f"memory plan: packed {levels}-bit modules, de-quantized on use: {resident} of {L} "
            f"layers resident on {device} ({resident * per_layer / gib:.1f} GiB), {streamed} "
            f"streamed from {kind}host memory ({host_bytes / gib:.1f} GiB{avail}), each copied "
            f"to the GPU at the level in use for its pass ({in_flight / gib:.1f} GiB in flight) "
            f"+ {parts}, of {of_free}; {where}"), streamed=streamed, host_bytes=host_bytes)
    raise UserError(
        f"SPQE on this model needs about {(fixed + one_layer + in_flight) / gib:.1f} GiB of GPU "
        f"memory even with every layer's packed {levels}-bit modules streamed from host memory "
        f"({packed / gib:.1f} GiB in all; de-quantized copies: {copies / gib:.1f} GiB): "
        f"{parts}, {(one_layer + in_flight) / gib:.1f} GiB for the layer in hand, "
        f"{work / gib:.1f} GiB working memory; but {device} has {of_free}. Use fewer "
        "calibration tokens (`windows`, `window_tokens`), a smaller `micro_batch`, or a GPU "
        "with more memory; `gpus` speeds SPQE up but gives every GPU its own full copy.")


def check_before_loading(config: RunConfig, backend) -> None:
    """From the config alone (a GGUF's header), in seconds: the architecture is one
    impq-tui can take apart, and every decoder linear suits the backend at both precisions."""
    from core.models import check_structure, linear_shapes, structure_of

    meta = structure_of(config.model)
    if meta is None:
        return           # no readable config: load_model says why
    check_structure(meta)
    for name, shape in linear_shapes(meta):
        for bits in config.levels:
            backend.check(shape, bits, name)
    if config.backend == "gguf" and Path(os.path.expanduser(config.model)).is_dir():
        # A gguf run is measured for a GGUF export: a checkpoint that export could not
        # convert is refused now, with llama.cpp's converter command, not after the run.
        from core.export.gguf import gguf_input

        gguf_input(config, convert=False)


def prepare(config: RunConfig, callback: events.Callback = events.ignore,
            cancel: threading.Event | None = None) -> Prepared:
    device = pick_device(config.device)
    backend = backend_for(config)
    check_before_loading(config, backend)
    plan = MemoryPlan(False, False, "")
    if device.type == "cuda":
        cap = gpu_memory_cap()
        plan = plan_memory(config, device, backend, cap=cap)
        if cap is not None:    # held to, as a co-tenant of the card expects (not only planned)
            index = device.index if device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    if plan.summary:
        callback(events.Log(plan.summary))
    callback(events.Log(f"loading model {config.model} on {device} ({config.dtype})"))
    loaded = load_model(config.model, device, DTYPES[config.dtype], by_layer=plan.by_layer)
    if loaded.tokenizer is None:     # random:<shape>: random weights want no text, only token ids
        windows = torch.randint(0, loaded.model.config.vocab_size,
                                (config.windows, config.window_tokens),
                                generator=torch.Generator().manual_seed(config.seed))
    else:
        text = load_text(config.calib_text, "calibration")
        windows = token_windows(text, loaded.tokenizer, config.windows, config.window_tokens,
                                config.seed)
    callback(events.Log(f"{loaded.name}: {len(loaded.layers)} decoder layers; calibration "
                        f"{config.windows} x {config.window_tokens} tokens"))

    def on_layer(i: int, L: int) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        if i == L or i % max(1, L // 5) == 0:
            callback(events.Log(f"quantized layer {i}/{L} to {' and '.join(map(str, config.levels))} "
                                f"bits ({backend.name})"))

    if hasattr(backend, "calibrate"):   # gguf's importance matrix, GPTQ's Hessians: these windows
        what = "Hessians (GPTQ)" if backend.name == "gptq" else "importance matrix"
        callback(events.Log(f"{what} on {windows.shape[0]} x {windows.shape[1]} "
                            "calibration tokens"))
        backend.calibrate(loaded, windows, config.micro_batch)
    if hasattr(backend, "first_use") and (note := backend.first_use(device)) is not None:
        callback(events.Log(note))     # quanto's kernel build: minutes with nothing to show
    switch = LayerSwitch(loaded, backend, real=plan.packed, levels=[config.levels] * len(loaded.layers),
                         on_layer=on_layer, stream=range(min(plan.streamed, len(loaded.layers))))
    if switch.streamed is not None and not switch.streamed.pinned:
        callback(events.Log("host memory could not be page-locked for the streamed layers: "
                            "their copies to the GPU are slower", "warning"))
    return Prepared(loaded=loaded, windows=windows, backend=backend, switch=switch)


def costs_record(prepared: Prepared) -> dict:
    record = {**prepared.switch.costs().to_json(), "layers": prepared.loaded.linear_names}
    if hasattr(prepared.backend, "describe"):   # gguf: the types, and llama.cpp's fallbacks
        record["types"] = prepared.backend.describe(linear_shapes(prepared.loaded.model))
    return record


class _Meter:
    """Turns evaluations into Progress events (rates, ETA, device, GPU memory) and keeps
    status.json current, about once a second, for apps watching from another process."""

    STATUS_EVERY_S = 1.0

    def __init__(self, callback, config: RunConfig, run: RunDir, device: torch.device, L: int,
                 tokens: int, done: int, parallel: int = 1):
        self.callback, self.config, self.run, self.device, self.L = callback, config, run, device, L
        self.last_status = 0.0
        self.parallel = parallel    # processes evaluating at the same rate (multi-GPU)
        self.tokens, self.done = tokens, done
        self.t0 = time.perf_counter()
        self.evals = 0
        self.layer_passes = 0      # decoder-layer forward passes, to count full-model equivalents
        self.sample = done

    def on_eval(self, step: int, steps: int, from_layer: int) -> None:
        self.evals += 1
        self.layer_passes += self.L - from_layer
        elapsed = time.perf_counter() - self.t0
        rate = self.parallel * self.evals / elapsed if elapsed > 0 else 0.0
        per_sample = self.L * (len(self.config.levels) - 1)     # evaluations in one walk
        remaining = (self.config.samples - self.sample - 1) * per_sample + (steps - step)
        gpu = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        self.emit(events.Progress(
            sample=self.sample + 1, samples=self.config.samples, step=step, steps=steps,
            evals=self.evals, evals_per_s=rate,
            tokens_per_s=(self.parallel * self.tokens * self.layer_passes / self.L / elapsed
                          if elapsed > 0 else 0.0),
            elapsed_s=elapsed, eta_s=remaining / rate if rate > 0 else None,
            device=str(self.device), gpu_mem_bytes=gpu))

    def emit(self, progress: events.Progress) -> None:
        self.callback(progress)
        now = time.monotonic()
        if now - self.last_status >= self.STATUS_EVERY_S:
            self.last_status = now
            write_status(self.run, "running", progress)


def write_status(run: RunDir, state: str, progress: events.Progress | None = None,
                 message: str = "") -> None:
    """The writer's state for watchers: running | completed | cancelled | failed."""
    record = {"state": state, "pid": os.getpid(), "time": time.time(), "message": message,
              "progress": dataclasses.asdict(progress) if progress else None}
    try:
        run.write_json(STATUS, record)
    except (OSError, UserError):
        # A watcher's convenience must never stop the run. A final state must still reach
        # watchers on a full disk, where no new file can be made: rewrite the old one.
        if state != "running":
            overwrite_in_place(run.path / STATUS, json.dumps(record, sort_keys=True) + "\n")


def run_spqe(config: RunConfig, run: RunDir, callback: events.Callback = events.ignore,
             cancel: threading.Event | None = None, pause: threading.Event | None = None,
             indices: list[int] | None = None) -> str:
    """Run (or continue) SPQE until `config.samples` samples exist in `run`.

    Returns "completed" or "cancelled". `indices` restricts this process to some sample
    indices (one worker of several)."""
    cancel = cancel or threading.Event()
    run.lock()
    try:
        return _run(config, run, callback, cancel, pause, indices)
    except KeyboardInterrupt:      # a signal while preparing (impq_tui.cli.run.on_signals)
        _finish(run, callback, "cancelled", "interrupted")
        raise
    except Exception as exc:
        user = isinstance(exc, UserError)
        message = str(exc) if user else f"{type(exc).__name__}: {exc}"
        write_status(run, "failed", message=message)
        run.log(f"error: {message}")
        callback(events.Failed(message, user_error=user))
        callback(events.Finished("failed", len(run.samples()), str(run.path)))
        raise
    finally:
        run.unlock()


def _run(config, run, callback, cancel, pause, indices) -> str:
    if config.samples < 1:
        raise InvalidField("samples", f"must be at least 1 (got {config.samples}).")
    done = {r["m"] for r in run.samples()}
    wanted = indices if indices is not None else range(config.samples)
    todo = [m for m in wanted if m not in done]
    run.log(f"start: {len(done)} samples on disk, {len(todo)} to go")
    if not todo and run.has(COSTS):
        callback(events.Log(f"all {config.samples} samples are already done"))
        callback(events.Finished("completed", len(done), str(run.path)))
        return "completed"

    # Budgets outside the run's levels are refused before minutes of loading.
    bits = settle.budgets_for(config.levels, config.until_settled) if config.until_settled else ()
    part = check_model_files(run, config)
    try:
        prepared = prepare(config, callback, cancel)
    except Cancelled:
        return _finish(run, callback, "cancelled", "cancelled while preparing")
    check_fingerprint(run, config, prepared.windows, callback, part)
    save_costs(run, costs_record(prepared))
    if config.model_name != prepared.loaded.name:
        run.update_config(replace(config, model_name=prepared.loaded.name))

    device = prepared.loaded.device
    evaluator = PrefixEvaluator(prepared.loaded, prepared.windows, config.micro_batch,
                                compile=config.compile, on_retry=warner(run, callback),
                                layer_scope=prepared.switch.unpacked)
    meter = _Meter(callback, config, run, device, prepared.switch.L, prepared.windows.numel(), len(done))
    sampler = Sampler(prepared.switch, evaluator, config.seed, config.antithetic,
                      on_eval=meter.on_eval, cancel=cancel, pause=pause, levels=config.levels)
    settler = settle.Settler(run.costs(), settle.SettleRule(bits=bits), config.antithetic) \
        if config.until_settled else None
    try:
        sampler.start()
        for m in todo:
            sample = sampler.sample(m)
            run.append_sample(sample.to_record())
            meter.sample += 1
            run.log(f"sample {m + 1} done in {sample.seconds:.1f}s")   # 1-based, as on screen
            callback(events.SampleDone(index=m, permutation=tuple(sample.permutation),
                                       d=tuple(sample.d), v_high=sample.v_high, v_low=sample.v_low,
                                       finite=sample.nonfinite is None))
            if sample.nonfinite is not None:
                handle_nonfinite(run, callback, sample.to_record(), sampler.nonfinite_alone)
            if settler is not None and settler.observe(run.D()):
                callback(events.Log(settler.message()))
                return _finish(run, callback, "completed",
                               f"completed (settled) with {len(run.samples())} of {config.samples} "
                               f"samples; {settler.message()}")
    except Cancelled:
        return _finish(run, callback, "cancelled", "cancelled; the sample in flight was dropped")
    return _finish(run, callback, "completed", "completed")


def check_model_files(run: RunDir, config: RunConfig) -> dict | None:
    """Before loading (seconds, where a load takes minutes): the model's files and the
    library versions are those the run recorded. Returns the model part taken now."""
    part = fingerprint.model_part(config.model)
    stored = run.config.fingerprint
    if fingerprint.comparable(stored) and part is not None:
        _refuse_changes(run, fingerprint.differences(
            stored, {**part, "versions": fingerprint.versions(config.backend)}))
    return part


def check_fingerprint(run: RunDir, config: RunConfig, windows: torch.Tensor,
                      callback: events.Callback, part: dict | None = None) -> None:
    """After loading, before anything is written: the whole fingerprint (the calibration
    tokens too) is the one the run recorded; a run without one records it now."""
    now = fingerprint.take(config.model, config.backend, windows,
                           part if part is not None else fingerprint.model_part(config.model))
    stored = run.config.fingerprint
    if not fingerprint.comparable(stored):
        if run.samples():
            made = ("before impq-tui recorded" if stored is None else
                    "by an impq-tui that recorded in another way")
            warner(run, callback)(
                f"this run was made {made} what its samples were measured with: it cannot be "
                f"checked that {config.model} and the calibration text are unchanged since. "
                "Recorded them now; later commands check against these.")
        run.record_fingerprint(now)
        return
    _refuse_changes(run, fingerprint.differences(stored, now))


def _refuse_changes(run: RunDir, changes: list[str]) -> None:
    if not changes:
        return
    raise UserError(
        f"run {run.path} was measured with other inputs than there are now: "
        f"{'; '.join(changes)}. New samples would be mixed with old ones of a different "
        "model or text: nothing was written. Put back what the run was made with (or install "
        "those versions), or start a new run.")


def save_costs(run: RunDir, costs: dict) -> None:
    """costs.json, checked against the sizes measured now when the run already has one."""
    if run.has(COSTS) and run.read_costs() != costs:
        raise UserError(f"{run.path / COSTS} does not match the layer sizes measured now: the "
                        "model or backend changed since this run began. Start a new run.")
    run.write_costs(costs)


def warner(run: RunDir, callback: events.Callback):
    """A function that reports a warning to the caller and the run's log."""
    def warn(message: str) -> None:
        run.log(f"warning: {message}")
        callback(events.Log(message, "warning"))
    return warn


def handle_nonfinite(run: RunDir, callback: events.Callback, record: dict,
                     alone: Callable[[], list[int]]) -> None:
    """A sample met a NaN or infinite loss. It is on disk, flagged, and out of every
    estimate; say which layers cause it. When the all-4-bit or all-2-bit state itself is
    non-finite, every sample would be too: stop with the reason."""
    info = record["nonfinite"]
    low = info["low_layers"]
    if record["v_high"] is None:
        raise UserError(f"the loss with every layer at 4 bits is {info['value']}: the model or "
                        "its 4-bit quantization is numerically broken (check the dtype; float16 "
                        "overflows on some models, use bfloat16 or float32).")
    culprits = alone()
    state = (f"layers at 2 bits then: {_ranges(low)}" if len(low) < len(record["d"])
             else "every layer at 2 bits")
    blame = (f"layer{'s' if len(culprits) > 1 else ''} {_ranges(culprits)} at 2 bits alone "
             f"give{'' if len(culprits) > 1 else 's'} a non-finite loss" if culprits else
             "no single layer does it alone; it takes several at 2 bits together")
    message = (f"sample {record['m'] + 1}: the loss became {info['value']} ({state}); {blame}. The "
               "sample is kept in samples.jsonl, flagged, and left out of the estimates.")
    if record["v_low"] is None:
        raise UserError(message + " Every sample passes through the all-2-bit state, so SPQE "
                        "cannot go on: use a smaller `group_size`, the other `backend`, or "
                        "another dtype.")
    warner(run, callback)(message)


def _ranges(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 12 else \
        f"{', '.join(map(str, layers[:12]))} and {len(layers) - 12} more"


def _finish(run: RunDir, callback, status: str, message: str) -> str:
    write_status(run, status)
    run.log(message)
    callback(events.Finished(status, len(run.samples()), str(run.path)))
    return status
