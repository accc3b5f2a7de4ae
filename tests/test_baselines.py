"""Each baseline's score on a real tiny Llama (random weights) against the same quantity
computed for one layer by hand, with plain torch ops on the model's own forward, and the
knapsack that turns scores into an allocation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core import baselines
from core.backends import get_backend
from core.data import load_text, token_windows
from core.models import load_model
from core.solver import Costs, budget_bytes

LAYER = 1   # a middle layer: hidden_states[LAYER + 1] is its output (the last one is normed)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def calib(loaded):
    return token_windows(load_text("builtin", "calibration"), loaded.tokenizer, 4, 32, seed=0)


def layer_weights(loaded, i: int) -> list[torch.nn.Parameter]:
    layer = loaded.layers[i]
    return [layer.get_submodule(name).weight for name in PROJECTIONS]


def hidden_states(loaded, calib) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return loaded.model(input_ids=calib, output_hidden_states=True).hidden_states


def test_lim_by_hand(loaded, calib):
    s = baselines.lim_scores(loaded, calib, micro_batch=3)
    hs = hidden_states(loaded, calib)
    x_in, x_out = hs[LAYER], hs[LAYER + 1]
    cos = (x_in * x_out).sum(-1) / (x_in.norm(dim=-1) * x_out.norm(dim=-1))
    assert s[LAYER] == pytest.approx(float(1 - cos.mean()), rel=1e-5)
    assert s.shape == (4,) and (s > 0).all() and (s < 2).all()


def test_activation_by_hand(loaded, calib):
    s = baselines.activation_scores(loaded, calib, micro_batch=3)
    out = hidden_states(loaded, calib)[LAYER + 1]
    assert s[LAYER] == pytest.approx(float(out.double().pow(2).sum().sqrt()), rel=1e-6)


def test_zscore_by_hand(loaded):
    s = baselines.zscore_scores(loaded)
    outliers = weights = 0
    for W in layer_weights(loaded, LAYER):
        z = (W - W.mean()) / W.std(correction=0)
        outliers += int((z.abs() > 3).sum())
        weights += W.numel()
    assert weights == sum(p.numel() for p in loaded.layers[LAYER].parameters() if p.dim() == 2)
    assert s[LAYER] == outliers / weights
    # Gaussian initial weights: about 0.27% lie beyond 3 standard deviations
    assert 0.001 < s[LAYER] < 0.006


def test_zscore_sees_planted_outliers(tiny_model_dir):
    fresh = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    W = fresh.layers[3].mlp.down_proj.weight
    with torch.no_grad():
        W.view(-1)[:200] = 1.0    # 50 sigma: 3 sigma of the matrix stays below 0.5
    s = baselines.zscore_scores(fresh)
    assert s.argmax() == 3
    assert s[3] > 200 / sum(w.numel() for w in layer_weights(fresh, 3))


def test_sensitivity_by_hand(loaded, calib):
    backend = get_backend("quanto")

    def Q(name, W):
        return backend.quantize_weight(W, 2).weight

    s = baselines.sensitivity_scores(loaded, calib, Q, micro_batch=3)
    params = layer_weights(loaded, LAYER)
    for p in params:
        p.requires_grad_(True)
    try:
        logits = loaded.model(input_ids=calib).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), calib[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, params)
    finally:
        for p in params:
            p.requires_grad_(False)
    expected = sum(float((g.double() * (Q(None, W.detach()) - W.detach()).double()).sum())
                   for g, W in zip(grads, params))
    assert s[LAYER] == pytest.approx(abs(expected), rel=1e-4)
    assert all(p.grad is None and not p.requires_grad for p in loaded.model.parameters())


def test_sensitivity_is_the_first_order_loss_change(tiny_model_dir, calib):
    """s_i = |d/dt v(W + t (Q(W) - W))| at t = 0: check against a central difference in
    float64, with Q(W) the quanto 2-bit weights of layer LAYER (the others left as they are)."""
    model64 = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float64)
    backend = get_backend("quanto")
    names = [f"model.layers.{LAYER}.{p}" for p in PROJECTIONS]
    W = {n: model64.model.get_submodule(n).weight.detach().clone() for n in names}
    Q = {n: backend.quantize_weight(W[n].float(), 2).weight.double() for n in names}
    s = baselines.sensitivity_scores(model64, calib, lambda n, W_: Q.get(n, W_), micro_batch=4)

    def loss_at(t: float) -> float:
        with torch.no_grad():
            for n in names:
                model64.model.get_submodule(n).weight.copy_(W[n] + t * (Q[n] - W[n]))
            logits = model64.model(input_ids=calib).logits
            return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                         calib[:, 1:].reshape(-1)))

    # RMSNorm computes in float32 even in a float64 model, so the loss carries ~1e-9 of
    # noise: a step of 1e-2 keeps it below the O(h^2) truncation error, both ~1e-4 relative.
    h = 1e-2
    slope = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert s[LAYER] == pytest.approx(abs(slope), rel=1e-3)


def test_knapsack_raises_the_highest_scores_within_the_budget():
    costs = Costs(m_lo=(100, 100, 100, 100), m_hi=(200, 200, 200, 200), params=(400,) * 4)
    alloc = baselines.allocation([0.1, 0.4, 0.3, 0.2], costs, bits=3.0)
    assert alloc.bits_per_layer == (2, 4, 4, 2)
    assert alloc.bytes == budget_bytes(costs, 3.0) == 600
    one = baselines.allocation([0.1, 0.4, 0.3, 0.2], costs, bits=2.75)   # room for one layer
    assert one.bits_per_layer == (2, 4, 2, 2) and one.bytes <= one.budget_bytes
