"""IMPQ against the isolated baselines at equal memory, with the real backend's modules.

    compare(run, [2.25, 2.5, 3.0, 3.5], eval_text="builtin", ...) -> CompareResult

loads the run's model once, computes the baselines' scores on the unquantized model
over the run's calibration windows, builds every linear's real quantized module once
per precision (2 and 4 bits), solves each method's allocation at each budget (IMPQ by
its quadratic model, IMPQ-local by the budget-local model of core.interactions and
IMPQ-fit by the model core.fit fits to the visited states, our extensions, the baselines by the knapsack, all with the same costs and SCIP;
IMPQ-fit, checked, our third, by measuring its candidates on the calibration windows with
the same modules, core.checked), and evaluates each distinct allocation by swapping module references, on one set of
evaluation tokens shared by every method. Allocations are evaluated in lexicographic
order of their bit vectors, so consecutive ones share the longest prefix of layers
and the prefix cache of PrefixEvaluator skips the layers before the first change.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from core import baselines, events
from core.backends import backend_for
from core.checked import CHECK_WINDOWS, Checked, choose, measurer
from core.checked import describe as describe_checked
from core.data import describe, eval_tokens, load_text, token_windows
from core.errors import InvalidField, UserError
from core.evaluate import IMPQ, IMPQ_CHECKED, IMPQ_FIT, IMPQ_LOCAL, solve_fit, solve_local  # noqa: F401
from core.fingerprint import check_model, unchecked
from core.fit import fit_states
from core.interactions import predicted_delta, quadratic_model
from core.models import LoadedModel, load_model, pick_device
from core.results import (  # noqa: F401
    COMPARE_DIR,
    DEFAULT_BITS,
    LABELS,
    METHODS,
    MODEL_VERSIONS,
    UNIFORM_HIGH,
    UNIFORM_LOW,
    CompareResult,
    MethodResult,
    load_saved,
)
from core.runs import RunDir, write_error
from core.settings import eval_settings
from core.solver import (
    HIGH_BITS,
    LOW_BITS,
    Allocation,
    Costs,
    solve_impq,
    solve_knapsack,
)
from core.switching import LayerSwitch, PrefixEvaluator


def tokens_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to("cpu", torch.int64).numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------ compare

def compare(run: RunDir, bits_list=DEFAULT_BITS, *, eval_text: str | None = None,
            windows: int | None = None, window_tokens: int | None = None,
            backend: str | None = None, device: str | None = None, alpha: float = 0.5,
            callback: events.Callback = events.ignore, cancel: threading.Event | None = None,
            save: bool = True) -> CompareResult:
    """Every method at every budget in `bits_list`, plus the uniform references, evaluated
    with the real backend's modules on the same evaluation tokens (see the module doc).
    With save, the JSON and the plot go to the run's compare/ folder."""
    t0 = time.perf_counter()
    config = run.config
    bits_list = _check_bits(bits_list, config.levels)
    D = run.D()
    if len(D) == 0:
        raise UserError(f"run {run.path} has no finished SPQE sample yet: nothing to compare. "
                        f"Resume the run (`resume`) to take samples.")
    qmodel = quadratic_model(D, alpha=alpha, paired=config.antithetic)
    warnings: list[str] = []

    def log(message: str, level: str = "info") -> None:
        if level == "warning":
            warnings.append(message)
        callback(events.Log(message, level))

    callback(events.Step(0, 1, "loading the model"))
    loaded, backend_impl, settings = _load(run, device, backend, eval_text, windows,
                                           window_tokens, log)
    micro = max(1, config.micro_batch)
    calib = calibration_windows(loaded, config)
    tokens = eval_tokens(loaded.tokenizer, settings, config.calib_text, log)
    events.check_cancel(cancel)

    def quantized(i: int, L: int) -> None:
        events.check_cancel(cancel)
        callback(events.Step(i, L, "quantizing layers"))

    t = time.perf_counter()
    log(f"quantizing {sum(map(len, loaded.linear_names))} linears to "
        f"{' and '.join(map(str, config.levels))} bits ({backend_impl.name})")
    callback(events.Step(0, len(loaded.layers), "quantizing layers"))
    real = LayerSwitch(loaded, backend_impl, real=True, keep_original=True, on_layer=quantized,
                       levels=[config.levels] * len(loaded.layers))
    real.restore_original()
    t_quantize = time.perf_counter() - t
    t = time.perf_counter()
    log(f"baseline scores on {calib.shape[0]} x {calib.shape[1]} calibration tokens")
    callback(events.Step(0, 1, "baseline scores"))
    with events.cancel_between_layers(loaded.layers, cancel):
        scores = _baseline_scores(loaded, calib, real, backend_impl, micro)
    t_scores = time.perf_counter() - t

    costs, costs_source = _costs(run, real, backend_impl, config, log)
    fitted = _fitted(D, run.P(), log)
    allocations = _allocations(qmodel, scores, costs, bits_list, D=D, perms=run.P(), alpha=alpha,
                               fitted=fitted, cancel=cancel, callback=callback)
    if fitted is not None:
        measure = measurer(loaded, real, check_windows(loaded, config), micro, cancel)
        for k, b in enumerate(bits_list):
            callback(events.Step(k, len(bits_list), "IMPQ-fit, checked: measuring candidates"))
            checked = choose(D, run.P(), costs, measure, bits=b, alpha=alpha,
                             paired=config.antithetic, fitted=fitted)
            log(f"{b:g} bits: {describe_checked(checked)}")
            allocations[(IMPQ_CHECKED, b)] = replace(
                checked.allocation, predicted_delta_nll=predicted_delta((qmodel.a, qmodel.K), checked.allocation.q))

    t = time.perf_counter()
    evaluator = PrefixEvaluator(loaded, tokens, micro)
    with events.cancel_between_layers(loaded.layers, cancel):
        measured, ppl_original, passes = _evaluate_all(evaluator, real, allocations, log, cancel,
                                                       callback)
    t_eval = time.perf_counter() - t

    sha = tokens_sha256(tokens)
    results = tuple(_row(method, b, alloc, measured[alloc.bits_per_layer], evaluator.predicted, sha,
                         config.levels[-1])
                    for (method, b), alloc in allocations.items())
    result = CompareResult(
        results=results, bits=tuple(bits_list), ppl_original=ppl_original, scores=scores,
        model=loaded.name, backend=backend_impl.name, group_size=config.group_size,
        samples=len(D), alpha=alpha, costs_source=costs_source,
        calib={"text": config.calib_text, "windows": config.windows,
               "window_tokens": config.window_tokens, "seed": config.seed},
        eval={"text": settings.text, "description": describe(settings.text),
              "windows": tokens.shape[0], "window_tokens": tokens.shape[1], "dtype": settings.dtype,
              "tokens": evaluator.predicted, "tokens_sha256": sha},
        timings={"scores_s": t_scores, "quantize_s": t_quantize, "eval_s": t_eval,
                 "evaluations": len(measured) + 1, "rows": len(results),
                 "layer_passes": passes, "total_s": time.perf_counter() - t0},
        device=str(loaded.device), warnings=tuple(warnings), versions=dict(MODEL_VERSIONS))
    events.check_cancel(cancel)      # "nothing was written" must hold for a cancel this late too
    return save_result(run, result) if save else result


def _load(run: RunDir, device: str | None, backend: str | None, text, windows, window_tokens,
          log):
    """The run's model in the evaluation dtype of core.settings (the run's own where it runs
    on the run's kind of device, so the baselines' calibration matches SPQE's), the
    backend to evaluate, and the evaluation settings."""
    config = run.config
    dev = pick_device(device or config.device)
    settings = eval_settings(config, dev, text=text, windows=windows, window_tokens=window_tokens)
    backend_impl = backend_for(config, backend)
    check_model(config)           # refused when the model's files changed since the run
    if (note := unchecked(config)) is not None:
        log(note, "warning")
    log(f"loading {config.model} on {dev} ({settings.dtype})")
    loaded = load_model(config.model, dev, settings.torch_dtype)
    L, samples_L = len(loaded.layers), run.D().shape[1] // (len(config.levels) - 1)
    if samples_L != L:
        raise UserError(f"run {run.path} has samples for {samples_L} layers; {config.model} "
                        f"has {L}. The run belongs to another model.")
    if hasattr(backend_impl, "calibrate"):   # gguf: the importance matrix SPQE quantized with
        backend_impl.calibrate(loaded, calibration_windows(loaded, config), config.micro_batch)
    return loaded, backend_impl, settings


def checked_allocation(run, *, bits: float | None = None, budget: int | None = None,
                       alpha: float = 0.5, device: str | None = None, callback=None,
                       cancel=None) -> Checked:
    """IMPQ-fit, checked (core.checked), of a run at a budget: the run's model loaded as
    compare loads it (its device and dtype, the real backend's modules), its candidates
    measured on the run's calibration windows. Logs what it measured through `callback`."""
    callback = callback or events.ignore
    config = run.config
    D = run.D()
    fitted = fit_states(D, run.P())       # before loading: refuses a run of fewer than 2 samples

    def log(message: str, level: str = "info") -> None:
        callback(events.Log(message, level))

    phase = events.Phases(callback, 3, cancel)
    phase("loading the model", "IMPQ-fit, checked: loading the model to measure its candidates")
    loaded, backend, _ = _load(run, device, None, None, None, None, log)
    phase("quantizing layers", f"quantizing the layers to {' and '.join(map(str, config.levels))} bits")
    real = LayerSwitch(loaded, backend, real=True, keep_original=False,
                       levels=[config.levels] * len(loaded.layers),
                       on_layer=lambda i, L: events.check_cancel(cancel))
    phase("measuring candidates", "measuring the candidates on the calibration windows")
    measure = measurer(loaded, real, check_windows(loaded, config), max(1, config.micro_batch),
                       cancel)
    checked = choose(D, run.P(), run.costs(), measure, bits=bits, budget=budget, alpha=alpha,
                     paired=config.antithetic, fitted=fitted)
    phase.done()
    log(describe_checked(checked))
    return checked


def _baseline_scores(loaded: LoadedModel, calib: torch.Tensor, real: LayerSwitch, backend,
                     micro: int) -> dict[str, np.ndarray]:
    """Every baseline's scores, on the original modules (in place while they are scored).
    Sensitivity's Q(W) is the weight the real 2-bit module computes with: no second
    quantization of every matrix."""
    return baselines.all_scores(
        loaded, calib, lambda name, W: backend.dequantize(real.module(name, real.levels[0])).to(W.dtype),
        micro)


def _row(method: str, b: float, alloc: Allocation, nll: float, tokens: int, sha: str,
         top: int) -> MethodResult:
    return MethodResult(
        method=method, target_bits=b, avg_bits=alloc.avg_bits, weight_bits=alloc.weight_bits,
        bytes=alloc.bytes, budget_bytes=alloc.budget_bytes,
        layers_high=sum(x == top for x in alloc.bits_per_layer),
        bits_per_layer=alloc.bits_per_layer, predicted_delta_nll=alloc.predicted_delta_nll,
        nll=nll, ppl=math.exp(nll), eval_tokens=tokens, eval_tokens_sha256=sha)


def calibration_windows(loaded: LoadedModel, config) -> torch.Tensor:
    """The run's calibration windows, reproduced from its config."""
    return token_windows(load_text(config.calib_text, "calibration"), loaded.tokenizer,
                         config.windows, config.window_tokens, config.seed)


def check_windows(loaded: LoadedModel, config) -> torch.Tensor:
    """The windows IMPQ-fit, checked judges its candidates on: the run's calibration text
    and seed, at least CHECK_WINDOWS windows of the run's length (the run's own number
    where larger; the run's own windows where the text holds fewer)."""
    n = max(config.windows, CHECK_WINDOWS)
    if n > config.windows:
        try:
            return calibration_windows(loaded, replace(config, windows=n))
        except UserError:
            pass
    return calibration_windows(loaded, config)


def _check_bits(bits_list, levels=(LOW_BITS, HIGH_BITS)) -> list[float]:
    bits = sorted({float(b) for b in bits_list})
    lo, hi = levels[0], levels[-1]
    if not bits:
        raise InvalidField("bits", "is empty: give at least one target, e.g. 2.25 2.5 3.0 3.5.")
    for b in bits:
        if not lo <= b <= hi:
            raise InvalidField("bits", f"{b:g} is outside [{lo}, {hi}], the run's levels: choose "
                                       f"average precisions between {lo} (all {lo}-bit) and {hi} "
                                       f"(all {hi}-bit).")
    return bits


def _costs(run: RunDir, real: LayerSwitch, backend, config, log) -> tuple[Costs, str]:
    """The run's costs when evaluating its own backend (so every budget is the one SPQE's
    allocations were solved for); the measured bytes of the modules built here otherwise."""
    costs, measured = run.costs(), real.costs()
    if backend.name != config.backend:
        log(f"budgets in {backend.name}'s bytes (the run measured {config.backend}'s)")
        return measured, "measured"
    if costs.sizes != measured.sizes:
        log(f"the modules built now take {measured.B_hi:,} B at {costs.levels[-1]} bits, the run measured "
            f"{costs.B_hi:,} B; budgets follow the run's costs.json", "warning")
    return costs, "run"


def _fitted(D, perms, log):
    """IMPQ-fit's model, or None (with a warning) where the run has too few samples."""
    try:
        return fit_states(D, perms)
    except UserError as exc:
        log(f"no IMPQ-fit row: {exc}", "warning")
        return None


def _allocations(qmodel, scores: dict, costs: Costs, bits_list, *, D, perms, alpha: float,
                 fitted=None, cancel: threading.Event | None = None,
                 callback: events.Callback = events.ignore) -> dict[tuple[str, float], Allocation]:
    """Every method's allocation at every budget (D and perms for IMPQ-local, the fitted
    model for IMPQ-fit). Every predicted_delta_nll is the run's (paper) quadratic model's,
    for comparability."""
    a, K = qmodel.a, qmodel.K
    out: dict[tuple[str, float], Allocation] = {}
    for k, b in enumerate(bits_list):
        events.check_cancel(cancel)
        callback(events.Step(k, len(bits_list), "solving allocations"))
        out[(IMPQ, b)] = solve_impq(D, costs, bits=b, model=qmodel)
        alloc = solve_local(D, perms, costs, bits=b, alpha=alpha)
        out[(IMPQ_LOCAL, b)] = replace(alloc, predicted_delta_nll=predicted_delta((a, K), alloc.q))
        if fitted is not None:
            alloc = solve_fit(fitted, costs, bits=b)
            out[(IMPQ_FIT, b)] = replace(alloc, predicted_delta_nll=predicted_delta((a, K), alloc.q))
        for m in baselines.BASELINES:
            out[(m, b)] = baselines.allocation(scores[m], costs, b, a=a, K=K)
    zeros = np.zeros(costs.L)
    lo, hi = float(costs.levels[0]), float(costs.levels[-1])
    out[(UNIFORM_LOW, lo)] = solve_knapsack(zeros, costs, bits=lo, a=a, K=K)
    out[(UNIFORM_HIGH, hi)] = solve_knapsack(zeros, costs, bits=hi, a=a, K=K)
    return out


def _evaluate_all(evaluator: PrefixEvaluator, real: LayerSwitch, allocations: dict, log,
                  cancel, callback: events.Callback = events.ignore
                  ) -> tuple[dict[tuple, float], float, int]:
    """Mean NLL of every distinct allocation, walked in lexicographic order so each
    evaluation recomputes only from the first layer that differs from the previous one."""
    real.restore_original()
    distinct = sorted({alloc.bits_per_layer for alloc in allocations.values()})
    callback(events.Step(0, len(distinct) + 1, "evaluating allocations"))
    log(f"perplexity of the unquantized model on {evaluator.predicted:,} tokens")
    evaluator.reset()
    ppl_original = math.exp(evaluator.evaluate())
    measured, passes = {}, 0
    for k, bits in enumerate(distinct, 1):
        events.check_cancel(cancel)
        callback(events.Step(k, len(distinct) + 1, "evaluating allocations"))
        first = real.apply(bits)
        first = 0 if first is None else first
        measured[bits] = evaluator.evaluate(first)
        passes += len(bits) - first
        log(f"evaluated allocation {k}/{len(distinct)}: {sum(x == real.levels[-1] for x in bits)} "
            f"layers at {real.levels[-1]} bits, ppl {math.exp(measured[bits]):.3f}")
    callback(events.Step(len(distinct) + 1, len(distinct) + 1, "evaluating allocations"))
    real.restore_original()   # leave the model as it was loaded
    return measured, ppl_original, passes


# ------------------------------------------------------------------ output files

def save_result(run: RunDir, result: CompareResult) -> CompareResult:
    """Write compare/<backend>.json, .png and .svg into the run directory."""
    stem = Path(COMPARE_DIR) / result.backend
    try:
        pngs = plot(result, run.path / stem)
    except OSError as exc:  # a full disk: the comparison ran, its files could not be written
        raise write_error(run.path / stem, exc, "the earlier comparison's files are as they were",
                          run_dir=run.path) from None
    except ImportError:     # a bare GPU box may lack matplotlib: the numbers still count
        pngs = []
        result = replace(result, warnings=(*result.warnings, "matplotlib is not installed: no "
                                           "plot was drawn; the JSON holds every number."))
    files = (str(run.path / stem.with_suffix(".json")), *map(str, pngs))
    result = replace(result, files=files)
    run.write_json(str(stem.with_suffix(".json")), result.to_json())
    return result


def plot(result: CompareResult, stem: Path, title: str | None = None) -> list[Path]:
    """Perplexity against effective bits, one line per method; PNG and SVG at `stem`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    draw(ax, result)
    ax.set_title(title or f"{result.model}, {result.backend} (group {result.group_size}), "
                          f"IMPQ from {result.samples} SPQE samples")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    for path in paths:        # drawn beside, then renamed: a kill leaves the old file whole
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
        try:
            fig.savefig(tmp, dpi=150)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return paths


MARKERS = {IMPQ: "o", IMPQ_LOCAL: "P", IMPQ_FIT: "X", IMPQ_CHECKED: "*", "sensitivity": "s", "lim": "^", "zscore": "D", "activation": "v"}


def draw(ax, result: CompareResult) -> None:
    """One method per line on a matplotlib Axes (also used by bench/quality's figure)."""
    for m in result.methods:
        rows = sorted((result.row(m, b) for b in result.bits), key=lambda r: r.avg_bits)
        ours = m in (IMPQ, IMPQ_LOCAL, IMPQ_FIT, IMPQ_CHECKED)
        ax.plot([r.avg_bits for r in rows], [r.ppl for r in rows], marker=MARKERS[m],
                label=LABELS[m], linewidth=2.2 if ours else 1.2, zorder=3 if ours else 2,
                linestyle={IMPQ_LOCAL: "--", IMPQ_FIT: "-.", IMPQ_CHECKED: ":"}.get(m, "-"))
    for (label, r), marker in zip(result.uniform(), "x+"):
        ax.scatter([r.avg_bits], [r.ppl], marker=marker, color="black", s=60, label=label, zorder=4)
    ax.axhline(result.ppl_original, color="grey", linestyle=":", label="unquantized")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (scales and zeros included)")
    ax.set_ylabel(f"perplexity, {result.eval['description']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
