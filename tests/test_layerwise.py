"""Models too large for memory: built one decoder layer at a time (core.layerwise), SPQE on
the backend's packed modules, and the memory plan that picks between them before loading."""
from __future__ import annotations

import pytest
import torch

from core.backends import get_backend
from core.engine import plan_memory
from core.errors import UserError
from core.models import load_model, shape_config
from core.runs import RunConfig
from core.switching import LayerSwitch, PrefixEvaluator

GiB = 2 ** 30
CPU = torch.device("cpu")


def _values(loaded, windows, *, real: bool, states) -> list[float]:
    switch = LayerSwitch(loaded, get_backend("hqq", 32), real=real)
    # micro-batches of one window: the packed layers are unpacked once per pass over both
    evaluator = PrefixEvaluator(loaded, windows, micro_batch=1, layer_scope=switch.unpacked)
    values = []
    for bits in states:
        first = switch.apply(bits)
        values.append(evaluator.evaluate(0 if first is None else first))   # from the change on
        assert evaluator.evaluate(0) == pytest.approx(values[-1], rel=1e-6)  # == a full pass
    return values, switch


def test_checkpoint_by_layer_measures_what_the_whole_load_measures(tiny_model_dir):
    windows = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    states = [[4, 4, 4, 4], [2, 4, 4, 4], [2, 4, 2, 4], [2, 2, 2, 2]]
    whole, _ = _values(load_model(str(tiny_model_dir), CPU, torch.float32), windows,
                       real=False, states=states)
    lazy = load_model(str(tiny_model_dir), CPU, torch.float32, by_layer=True)
    assert all(p.is_meta for layer in lazy.layers for p in layer.parameters())
    assert not lazy.model.get_output_embeddings().weight.is_meta
    packed, switch = _values(lazy, windows, real=True, states=states)
    # the same weights were read layer by layer; the packed modules compute the same values
    assert packed == pytest.approx(whole, rel=1e-5)
    assert len(set(round(v, 4) for v in packed)) == len(states)     # the states differ
    assert not any(p.is_meta for p in lazy.model.parameters())
    # only the quantized modules are left: no full-precision decoder weight survives
    assert not any(isinstance(m, torch.nn.Linear) for layer in lazy.layers for m in layer.modules())
    assert switch.m_lo[0] < switch.m_hi[0]


def test_random_by_layer_is_seeded_and_never_builds_the_whole_model():
    from core.models import SHAPES

    SHAPES["tiny-test"] = dict(model_type="llama", num_hidden_layers=3, hidden_size=64,
                               intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)
    try:
        a = load_model("random:tiny-test", CPU, torch.float32, by_layer=True)
        b = load_model("random:tiny-test", CPU, torch.float32, by_layer=True)
    finally:
        del SHAPES["tiny-test"]
    a.materialize(1)
    b.materialize(1)
    wa = a.layers[1].mlp.down_proj.weight
    assert torch.equal(wa, b.layers[1].mlp.down_proj.weight)
    assert wa.std().item() == pytest.approx(0.02, rel=0.1)
    assert a.layers[0].mlp.down_proj.weight.is_meta and a.layers[2].self_attn.q_proj.weight.is_meta
    assert torch.equal(a.layers[1].input_layernorm.weight, torch.ones(64))
    # rotary frequencies are real buffers, not meta
    assert not any(buf.is_meta for buf in a.model.buffers())


@pytest.mark.parametrize("free_gib, packed, by_layer", [(139, True, True), (78, True, True)])
def test_memory_plan_for_the_70b_shape(free_gib, packed, by_layer):
    config = RunConfig(model="random:llama-3.1-70b", dtype="bfloat16", windows=8,
                       window_tokens=1024, micro_batch=2)
    plan = plan_memory(config, torch.device("cuda"), get_backend("hqq"), free=free_gib * GiB,
                       host=120 * GiB)
    assert (plan.packed, plan.by_layer) == (packed, by_layer)
    assert "packed 2- and 4-bit modules" in plan.summary and "one decoder layer at a time" in plan.summary


def test_memory_plan_refuses_with_figures_and_keeps_small_models_dequantized():
    config = RunConfig(model="random:llama-3.1-70b", dtype="bfloat16", windows=8,
                       window_tokens=1024, micro_batch=2)
    # 40 GiB stream some layers from the host (tests/test_streaming.py); 12 cannot hold even one
    with pytest.raises(UserError, match=r"needs about 18\.\d GiB .* 12\.0 GiB free"):
        plan_memory(config, torch.device("cuda"), get_backend("hqq"), free=12 * GiB, host=120 * GiB)
    small = RunConfig(model="random:llama-3.1-8b", dtype="bfloat16", windows=8, window_tokens=1024)
    plan = plan_memory(small, torch.device("cuda"), get_backend("hqq"), free=78 * GiB, host=120 * GiB)
    assert (plan.packed, plan.by_layer) == (False, False)
    # the same 8B model on a 24 GiB card: packed copies, and built layer by layer
    plan = plan_memory(small, torch.device("cuda"), get_backend("hqq"), free=24 * GiB, host=120 * GiB)
    assert (plan.packed, plan.by_layer) == (True, False)
    assert shape_config("llama-3.1-70b").num_hidden_layers == 80
