"""Allocations of a run, and the perplexity they give.

allocate(): the IMPQ allocation of a run at a budget (SCIP, METHOD.md).
evaluate_allocation(): perplexity of an allocation on evaluation text, with the real
backend's quantized modules, and beside it the simulated perplexity (de-quantized
weights swapped in, as SPQE sees the model) and the unquantized model's.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from core import events
from core.backends import get_backend
from core.data import load_text, token_windows
from core.errors import UserError
from core.interactions import budget_local_model, quadratic_model
from core.models import LoadedModel, load_model, pick_device
from core.runs import RunDir
from core.solver import Allocation, frontier, low_share, resolve_budget, solve
from core.switching import PrefixEvaluator


def allocate(run: RunDir, *, bits: float | None = None, budget: int | None = None,
             alpha: float = 0.5, local: bool = False) -> Allocation:
    """IMPQ's allocation; with local, from the budget-local model (our extension)."""
    D = run.D()
    if len(D) == 0:
        raise UserError(f"run {run.path} has no finished SPQE sample yet: nothing to solve. "
                        f"Continue it with `impq-tui run --resume {run.path}`.")
    if not 0 <= alpha <= 1:
        raise UserError(f"--alpha must lie in [0, 1] (got {alpha}).")
    costs = run.costs()
    if local:
        return solve_local(D, run.P(), costs, bits=bits, budget=budget, alpha=alpha)
    model = quadratic_model(D, alpha=alpha, paired=run.config.antithetic)
    return solve(model.a, model.K, costs, bits=bits, budget=budget)


def solve_local(D, perms, costs, *, bits: float | None = None, budget: int | None = None,
                alpha: float = 0.5) -> Allocation:
    """IMPQ-local's allocation (our extension): the model weighted toward this budget's
    number of 2-bit layers, solved by SCIP under the same budget as IMPQ."""
    share = low_share(costs, resolve_budget(costs, bits, budget))
    model = budget_local_model(D, perms, share, alpha=alpha)
    return solve(model.a, model.K, costs, bits=bits, budget=budget)


def result_stem(bits: float | None, budget: int | None = None, method: str = "impq") -> str:
    """The file name stem of an allocation or evaluation: bits-2.50, bits-2.125, bytes-N,
    with -local for IMPQ-local. Two decimals unless the target has more (2.125 and 2.13
    are different budgets and must not share a file)."""
    if bits is None:
        stem = f"bytes-{budget}"
    else:
        stem = f"bits-{bits:.2f}" if float(f"{bits:.2f}") == bits else f"bits-{bits!r}"
    return stem + ("-local" if method == "impq-local" else "")


def run_frontier(run: RunDir, alpha: float = 0.5, bits_grid=None) -> list[Allocation]:
    model = quadratic_model(run.D(), alpha=alpha, paired=run.config.antithetic)
    return frontier(model.a, model.K, run.costs(), bits_grid)


@dataclass(frozen=True)
class EvalResult:
    ppl: float                # real backend modules
    ppl_simulated: float      # de-quantized weights, as SPQE evaluates
    ppl_original: float       # the unquantized model, for reference
    eval_tokens: int          # tokens predicted (windows x (window_tokens - 1))
    eval_text: str
    windows: int
    window_tokens: int
    backend: str
    bits_per_layer: tuple[int, ...]
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["bits_per_layer"] = list(self.bits_per_layer)
        return d


def eval_windows(loaded: LoadedModel, text: str, windows: int, window_tokens: int,
                 seed: int) -> torch.Tensor:
    return token_windows(load_text(text, "evaluation"), loaded.tokenizer, windows, window_tokens, seed)


def perplexity(loaded: LoadedModel, windows: torch.Tensor, micro_batch: int) -> float:
    return math.exp(PrefixEvaluator(loaded, windows, micro_batch).evaluate())


def evaluate_allocation(run: RunDir, bits_per_layer: list[int], *, eval_text: str = "builtin",
                        windows: int | None = None, window_tokens: int | None = None,
                        backend: str | None = None, device: str | None = None,
                        callback: events.Callback = events.ignore) -> EvalResult:
    config = run.config
    start = time.perf_counter()
    dev = pick_device(device or config.device)
    from core.engine import device_defaults

    defaults = device_defaults(dev)
    windows = windows or 16   # the builtin evaluation half holds 27 windows of 2,048 tokens
    window_tokens = window_tokens or defaults["window_tokens"]
    backend_impl = get_backend(backend or config.backend, config.group_size)
    callback(events.Log(f"loading {config.model} for evaluation"))
    loaded = load_model(config.model, dev)
    if len(bits_per_layer) != len(loaded.layers):
        raise UserError(f"the allocation has {len(bits_per_layer)} layers, the model "
                        f"{len(loaded.layers)}.")
    tokens = eval_windows(loaded, eval_text, windows, window_tokens, config.seed)
    micro = max(1, config.micro_batch)

    callback(events.Log("perplexity of the unquantized model"))
    ppl_original = perplexity(loaded, tokens, micro)
    callback(events.Log("perplexity with simulated (de-quantized) weights"))
    ppl_simulated = _simulated(loaded, backend_impl, bits_per_layer, tokens, micro)
    callback(events.Log(f"perplexity with real {backend_impl.name} modules"))
    names = [n for layer in loaded.linear_names for n in layer]
    bits = [b for layer, b in zip(loaded.linear_names, bits_per_layer) for _ in layer]
    with torch.inference_mode():   # quanto's modules must be built in the mode they run in
        backend_impl.quantize_linears(loaded.model, names, bits)
    ppl = perplexity(loaded, tokens, micro)
    return EvalResult(ppl=ppl, ppl_simulated=ppl_simulated, ppl_original=ppl_original,
                      eval_tokens=tokens.shape[0] * (tokens.shape[1] - 1), eval_text=eval_text,
                      windows=tokens.shape[0], window_tokens=tokens.shape[1],
                      backend=backend_impl.name, bits_per_layer=tuple(bits_per_layer),
                      seconds=time.perf_counter() - start)


def _simulated(loaded: LoadedModel, backend, bits_per_layer, tokens, micro) -> float:
    modules = dict(loaded.model.named_modules())
    saved = []
    for names, bits in zip(loaded.linear_names, bits_per_layer):
        for name in names:
            lin = modules[name]
            saved.append((lin, lin.weight))
            lin.weight = torch.nn.Parameter(backend.quantize_weight(lin.weight.data, bits).weight,
                                            requires_grad=False)
    try:
        return perplexity(loaded, tokens, micro)
    finally:
        for lin, weight in saved:
            lin.weight = weight
