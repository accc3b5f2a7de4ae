"""Allocations of a run, and the perplexity they give.

allocate(): the IMPQ allocation of a run at a budget (SCIP, METHOD.md).
evaluate_allocation(): perplexity of an allocation on evaluation text, with the model an
export of it holds, and beside it the simulated perplexity (de-quantized weights
swapped in, as SPQE sees the model) and the unquantized model's.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from core import events
from core.data import eval_tokens
from core.errors import UserError
from core.fit import fit_states
from core.interactions import quadratic_model
from core.models import pick_device
from core.results import IMPQ, IMPQ_CHECKED, IMPQ_FIT, IMPQ_LOCAL, RUN_METHODS  # noqa: F401
from core.runs import RunDir
from core.solver import (  # noqa: F401  (solve_fit and solve_local are used from here too)
    FRONTIER_GRID,
    Allocation,
    frontier,
    solve_fit,
    solve_impq,
    solve_local,
)
from core.switching import LayerSwitch, perplexity


def allocate(run: RunDir, *, bits: float | None = None, budget: int | None = None,
             alpha: float = 0.5, local: bool = False, method: str | None = None) -> Allocation:
    """The allocation of a run at a budget by `method`: IMPQ (the paper's model, the
    default), IMPQ-local or IMPQ-fit (our extensions; `local` is IMPQ-local). IMPQ-fit,
    checked measures candidates with the model loaded: core.compare.checked_allocation."""
    method = method or (IMPQ_LOCAL if local else IMPQ)
    if method == IMPQ_CHECKED:
        raise UserError("IMPQ-fit, checked measures its candidates with the model loaded: "
                        "core.compare.checked_allocation gives it.")
    if method not in RUN_METHODS:
        raise UserError(f"unknown allocation method {method!r}; choose one of {', '.join(RUN_METHODS)}.")
    D = run.D()
    if len(D) == 0:
        raise UserError(f"run {run.path} has no finished SPQE sample yet: nothing to solve. "
                        f"Resume the run (`resume`) to take samples.")
    costs = run.costs()
    if method == IMPQ_LOCAL:
        return solve_local(D, run.P(), costs, bits=bits, budget=budget, alpha=alpha)
    if method == IMPQ_FIT:
        return solve_fit(fit_states(D, run.P()), costs, bits=bits, budget=budget)
    return solve_impq(D, costs, bits=bits, budget=budget, alpha=alpha, paired=run.config.antithetic)


def result_stem(bits: float | None, budget: int | None = None, method: str = "impq") -> str:
    """The file name stem of an allocation or evaluation: bits-2.50, bits-2.125, bytes-N,
    with -local for IMPQ-local and -fit for IMPQ-fit. Two decimals unless the target has more (2.125 and 2.13
    are different budgets and must not share a file)."""
    if bits is None:
        stem = f"bytes-{budget}"
    else:
        stem = f"bits-{bits:.2f}" if float(f"{bits:.2f}") == bits else f"bits-{bits!r}"
    return stem + {IMPQ_LOCAL: "-local", IMPQ_FIT: "-fit", IMPQ_CHECKED: "-checked"}.get(method, "")


def run_frontier(run: RunDir, alpha: float = 0.5, bits_grid=FRONTIER_GRID) -> list[Allocation]:
    model = quadratic_model(run.D(), alpha=alpha, paired=run.config.antithetic)
    return frontier(model.a, model.K, run.costs(), bits_grid, factor=model.factor)


@dataclass(frozen=True)
class EvalResult:
    ppl: float                    # the backend's real quantized model: what an export holds
    ppl_simulated: float | None   # de-quantized weights, as SPQE evaluates (None for GPTQ)
    ppl_original: float           # the unquantized model, for reference
    eval_tokens: int              # tokens predicted (windows x (window_tokens - 1))
    eval_text: str
    windows: int
    window_tokens: int
    dtype: str
    backend: str
    bits_per_layer: tuple[int, ...]
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["bits_per_layer"] = list(self.bits_per_layer)
        return d


def evaluate_allocation(run: RunDir, bits_per_layer: list[int], *, eval_text: str | None = None,
                        windows: int | None = None, window_tokens: int | None = None,
                        backend: str | None = None, device: str | None = None,
                        callback: events.Callback = events.ignore,
                        cancel: threading.Event | None = None) -> EvalResult:
    """Perplexity of the run's model with `bits_per_layer`, built exactly as
    `export_model` builds it (core.export: same loader, quantizer, dtype and tokens)."""
    from core.export import get_exporter
    from core.export.base import check_layers

    config = run.config
    start = time.perf_counter()
    dev = pick_device(device or config.device)
    exporter = get_exporter(backend or config.backend)
    exporter.check_available()
    settings = exporter.eval_settings(config, dev, text=eval_text, windows=windows,
                                      window_tokens=window_tokens)
    micro = max(1, config.micro_batch)

    phase = events.Phases(callback, 4 + exporter.simulates, cancel)
    step = phase.log

    try:
        phase("loading the model", f"loading {config.model} on {dev} ({settings.dtype}) for evaluation")
        loaded = exporter.load(config, dev, settings.torch_dtype)
        check_layers(loaded, len(bits_per_layer), config.model)
        tokens = eval_tokens(loaded.tokenizer, settings, config.calib_text,
                             lambda message, level="info": callback(events.Log(message, level)))
        phase("unquantized perplexity", "perplexity of the unquantized model")
        with events.cancel_between_layers(loaded.layers, cancel):
            ppl_original = perplexity(loaded, tokens, micro)
        ppl_simulated = None
        if exporter.simulates:
            phase("simulated perplexity",
                  "perplexity with simulated (de-quantized) weights, as SPQE measures")
            simulated = LayerSwitch(loaded, exporter.backend(config), keep_original=True,
                                    levels=[[b] for b in bits_per_layer],
                                    on_layer=lambda i, L: events.check_cancel(cancel))
            with events.cancel_between_layers(loaded.layers, cancel):
                ppl_simulated = perplexity(loaded, tokens, micro)
            simulated.restore_original()
            del simulated
        phase(f"quantizing ({exporter.name})", f"quantizing the layers with {exporter.name}")
        loaded = exporter.quantize(loaded, list(bits_per_layer), config, step,
                                   on_layer=lambda i, L: events.check_cancel(cancel))
        phase(f"{exporter.name} perplexity", f"perplexity with real {exporter.name} modules")
        with events.cancel_between_layers(loaded.layers, cancel):
            ppl = perplexity(loaded, tokens, micro)
        phase.done()
    finally:
        exporter.close()
    return EvalResult(ppl=ppl, ppl_simulated=ppl_simulated, ppl_original=ppl_original,
                      eval_tokens=tokens.shape[0] * (tokens.shape[1] - 1), eval_text=settings.text,
                      windows=tokens.shape[0], window_tokens=tokens.shape[1],
                      dtype=settings.dtype, backend=exporter.name,
                      bits_per_layer=tuple(bits_per_layer), seconds=time.perf_counter() - start)
