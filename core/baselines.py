"""The isolated-metric baselines IMPQ is compared with (METHOD.md, "Baselines").

Each gives a score s_i per decoder layer, higher meaning "more deserving of 4 bits":

    sensitivity  s_i = | sum over the layer's weights of g * (Q(W) - W) |, g the gradient
                 of the calibration loss (mean next-token NLL, nats) at the original
                 weights W, Q the backend's 2-bit quantizer: the first-order Taylor
                 estimate of the loss change of lowering layer i alone (LLM-MQ).
    lim          s_i = 1 - cos(x_in, x_out), the residual stream entering and leaving
                 layer i, averaged over every calibration token.
    zscore       s_i = the share of the layer's weights with |z| > 3, z standardized per
                 weight matrix (mean and population std of that matrix). Needs no data.
    activation   s_i = the Frobenius norm of layer i's output (the residual stream it
                 returns) over all calibration tokens.

All data-driven scores are computed on the unquantized model over the run's own
calibration windows. allocation() turns scores into an allocation with the same
knapsack, budget and solver for every baseline.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.models import LoadedModel
from core.results import BASELINES  # noqa: F401  (the names of the scores computed here)
from core.solver import Allocation, Costs, solve_knapsack
from core.switching import nll_sum

Z_THRESHOLD = 3.0

# (linear's qualified name, its original weight) -> Q(W), the 2-bit de-quantized weight
LowQuantizer = Callable[[str, torch.Tensor], torch.Tensor]


def _linears(loaded: LoadedModel) -> list[list[tuple[str, nn.Linear]]]:
    modules = dict(loaded.model.named_modules())
    return [[(name, modules[name]) for name in names] for names in loaded.linear_names]


def _batches(loaded: LoadedModel, windows: torch.Tensor, micro_batch: int):
    return windows.to(loaded.device).split(max(1, micro_batch))


def sensitivity_scores(loaded: LoadedModel, windows: torch.Tensor, quantize_low: LowQuantizer,
                       micro_batch: int = 8) -> np.ndarray:
    """s_i = |sum g * (Q(W) - W)| over layer i's linear weights; g = d v / d W at the
    original weights, v the mean NLL over all predicted calibration tokens."""
    layers = _linears(loaded)
    weights = [lin.weight for layer in layers for _, lin in layer]
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    head = loaded.model.get_output_embeddings()
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        with torch.enable_grad():
            for batch in _batches(loaded, windows, micro_batch):
                hidden = loaded.model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
                softcap = getattr(loaded.model.config, "final_logit_softcapping", None)
                loss = nll_sum(hidden, batch, head, softcap) / predicted
                loss.backward()
        s = np.zeros(len(layers))
        with torch.no_grad():
            for i, layer in enumerate(layers):
                total = torch.zeros((), dtype=torch.float64, device=loaded.device)
                for name, lin in layer:
                    W = lin.weight.detach()
                    Q = quantize_low(name, W)
                    total += (lin.weight.grad.double() * (Q.double() - W.double())).sum()
                s[i] = abs(float(total))
        return s
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)


@torch.inference_mode()
def residual_scores(loaded: LoadedModel, windows: torch.Tensor,
                    micro_batch: int = 8) -> dict[str, np.ndarray]:
    """LIM and Activation from one forward pass: hooks on every decoder layer read the
    hidden states entering and leaving it."""
    L = len(loaded.layers)
    cos_sum = torch.zeros(L, dtype=torch.float64, device=loaded.device)
    sq_sum = torch.zeros(L, dtype=torch.float64, device=loaded.device)
    tokens = 0

    def hook_for(i: int):
        def hook(_module, args, kwargs, output):
            x_in = (args[0] if args else kwargs["hidden_states"]).float()
            x_out = (output[0] if isinstance(output, tuple) else output).float()
            cos_sum[i] += F.cosine_similarity(x_in, x_out, dim=-1).double().sum()
            sq_sum[i] += x_out.double().square().sum()
        return hook

    hooks = [layer.register_forward_hook(hook_for(i), with_kwargs=True)
             for i, layer in enumerate(loaded.layers)]
    try:
        for batch in _batches(loaded, windows, micro_batch):
            loaded.model.get_decoder()(input_ids=batch, use_cache=False)
            tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return {"lim": (1 - cos_sum / tokens).cpu().numpy(),
            "activation": sq_sum.sqrt().cpu().numpy()}


def lim_scores(loaded: LoadedModel, windows: torch.Tensor, micro_batch: int = 8) -> np.ndarray:
    return residual_scores(loaded, windows, micro_batch)["lim"]


def activation_scores(loaded: LoadedModel, windows: torch.Tensor, micro_batch: int = 8) -> np.ndarray:
    return residual_scores(loaded, windows, micro_batch)["activation"]


@torch.no_grad()
def zscore_scores(loaded: LoadedModel, threshold: float = Z_THRESHOLD) -> np.ndarray:
    """The share of layer i's weights with |z| > threshold, z per weight matrix."""
    s = []
    for layer in _linears(loaded):
        outliers = weights = 0
        for _, lin in layer:
            W = lin.weight.float()
            std, mean = torch.std_mean(W, correction=0)
            outliers += int(((W - mean).abs() > threshold * std).sum())
            weights += W.numel()
        s.append(outliers / weights)
    return np.asarray(s, dtype=np.float64)


def all_scores(loaded: LoadedModel, windows: torch.Tensor, quantize_low: LowQuantizer,
               micro_batch: int = 8) -> dict[str, np.ndarray]:
    """Every baseline's scores, on the model as it is (call it with original weights)."""
    residual = residual_scores(loaded, windows, micro_batch)
    return {"sensitivity": sensitivity_scores(loaded, windows, quantize_low, micro_batch),
            "lim": residual["lim"], "zscore": zscore_scores(loaded),
            "activation": residual["activation"]}


def allocation(scores, costs: Costs, bits: float, a=None, K=None) -> Allocation:
    """Raise the highest-scoring layers to 4 bits within the budget of `bits` (the same
    budget and SCIP as IMPQ); a, K only add the quadratic model's prediction to it."""
    return solve_knapsack(scores, costs, bits=bits, a=a, K=K)
