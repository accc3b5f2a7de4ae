"""Mixture-of-experts models (core.experts): experts split into per-expert nn.Linear
modules compute what the fused ones do, take their layer's precision, count in its bytes,
and export to quanto and HQQ files that load back (in a fresh process, by the card's
snippet) to the same perplexity; GPTQ of every expert, from the tokens routed to it. Tiny
random models of real transformers configs, saved as transformers 5 saves them (Mixtral
in its hub layout, w1/w2/w3 per expert)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.engine import check_before_loading, run_spqe
from core.errors import UserError
from core.evaluate import allocate, evaluate_allocation
from core.export import export_model
from core.models import load_model, parameter_counts, seeded, tiny_config
from core.runs import RunConfig, RunDir

EXPERTS, TOP_K, EXPERT_WIDTH, SHARED_WIDTH = 4, 2, 32, 48
EVAL = {"windows": 2, "window_tokens": 32}


def moe_config(model_type: str, vocab: int = 512, layers: int = 2):
    """tiny_config with four small experts (two chosen per token) and a shared expert
    where the family has one."""
    config = tiny_config(model_type, layers=layers, vocab=vocab)
    for key in ("num_experts", "num_local_experts"):
        if hasattr(config, key):
            setattr(config, key, EXPERTS)
    config.num_experts_per_tok = TOP_K
    if hasattr(config, "moe_intermediate_size"):
        config.moe_intermediate_size = EXPERT_WIDTH
    if hasattr(config, "shared_expert_intermediate_size"):
        config.shared_expert_intermediate_size = SHARED_WIDTH
    return config


def expert_width(config) -> int:
    return getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def layer_weights(config) -> int:
    """Weights of one decoder layer's quantized linears: attention, every expert's three
    projections, the shared expert's; the router and the shared expert's gate left out."""
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * config.num_key_value_heads * head_dim
    shared = 3 * h * config.shared_expert_intermediate_size if hasattr(
        config, "shared_expert_intermediate_size") else 0
    return attention + EXPERTS * 3 * h * expert_width(config) + shared


def save_moe(path, tokenizer, model_type: str, seed: int = 1):
    """A checkpoint as transformers writes one: the fused model's save_pretrained."""
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(moe_config(model_type, vocab=len(tokenizer)),
                                                 dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def test_split_experts_compute_what_the_fused_ones_do(family, tiny_tokenizer, tmp_path):
    folder = save_moe(tmp_path / family, tiny_tokenizer, family)
    fused = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert any(p.ndim == 3 for p in fused.parameters())       # transformers 5 fuses them
    loaded = load_model(str(folder), torch.device("cpu"), torch.float32)
    assert not any(p.ndim >= 3 for p in loaded.model.parameters())
    config = loaded.model.config
    for i, names in enumerate(loaded.linear_names):
        experts = [n for n in names if ".experts." in n]
        assert len(experts) == EXPERTS * 3, names
        assert not any(n.endswith((".gate", "shared_expert_gate")) for n in names)   # routers
        assert sum(loaded.model.get_submodule(n).weight.numel() for n in names) == layer_weights(config)
    tokens = torch.randint(0, len(tiny_tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = fused(tokens).logits, loaded.model(tokens).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_moe_family_runs_end_to_end(family, tiny_tokenizer, tmp_path):
    """run, solve, eval, export (quanto, HQQ) with the reload check: the experts take
    their layer's bits and every one of them counts in its bytes."""
    model = save_moe(tmp_path / family, tiny_tokenizer, family)
    config = RunConfig(model=str(model), samples=2, windows=2, window_tokens=32, device="cpu",
                       group_size=32, micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    run = RunDir.open(run.path)
    costs = run.costs()
    width = layer_weights(moe_config(family, vocab=len(tiny_tokenizer)))
    assert list(costs.params) == [width, width]
    # quanto at 2 and 4 bits with group 32: packed weights plus a float32 scale and shift
    # per group of 32 (0.25 bytes per weight at 2 bits, 0.5 at 4)
    assert list(costs.m_lo) == [width // 4 + width // 32 * 8] * 2
    assert list(costs.m_hi) == [width // 2 + width // 32 * 8] * 2
    alloc = allocate(run, bits=3.0)
    assert alloc.bytes <= alloc.budget_bytes
    bits = [4, 2]      # each layer's experts at its own precision
    for backend in ("quanto", "hqq"):
        measured = evaluate_allocation(run, bits, backend=backend, **EVAL)
        assert measured.ppl == pytest.approx(measured.ppl_simulated, rel=1e-3)
        out = tmp_path / f"out-{backend}"
        exported = export_model(run, bits, backend, str(out), verify=True,
                                eval_windows=EVAL["windows"], eval_window_tokens=EVAL["window_tokens"])
        assert exported.ppl == pytest.approx(measured.ppl, rel=1e-5)
        assert exported.ppl_reloaded == pytest.approx(exported.ppl, rel=1e-5)
        record = json.loads((out / "allocation.json").read_text())
        for layer, b in zip(record["layers"], bits):
            assert layer["bits"] == b
            assert sum(".experts." in m for m in layer["modules"]) == EXPERTS * 3
        assert "convert_model" in (out / "README.md").read_text()


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="GPTQModel is not installed (pip install 'impq-tui[gptq]')")
def test_qwen3_moe_runs_end_to_end_with_gptq(tiny_tokenizer, tmp_path):
    """Each expert's Hessian comes from the tokens routed to it (a few of 64 here): every
    expert of a layer is GPTQ-packed at the layer's bits, the packed bytes are the run's
    costs, and the real GPTQModel modules compute what SPQE simulated."""
    from safetensors.torch import load_file

    from test_architectures import gptq_run_and_measure

    model = save_moe(tmp_path / "qwen3_moe", tiny_tokenizer, "qwen3_moe")
    run, bits = gptq_run_and_measure(model, tmp_path)
    out = tmp_path / "out"
    export_model(run, bits, "gptq", str(out))
    stored = load_file(str(out / "model.safetensors"))
    record = json.loads((out / "allocation.json").read_text())
    for layer, b in zip(record["layers"], bits):
        experts = [m for m in layer["modules"] if ".experts." in m]
        assert len(experts) == EXPERTS * 3 and layer["bits"] == b
        for name in experts:      # GPTQ packs 32 // bits codes per word: the layer's bits
            assert stored[f"{name}.qweight"].shape[0] * 32 // b == stored[f"{name}.g_idx"].numel()
        assert layer["bytes"] == (run.costs().m_hi if b == 4 else run.costs().m_lo)[layer["index"]]


def _config_only(path, config):
    path.mkdir()
    config.save_pretrained(path)
    return path


def test_the_gguf_export_of_a_mixtral_checkpoint_passes_its_check_before_loading(tiny_tokenizer, tmp_path,
                                                                                monkeypatch):
    """impq-tui converts Mixtral checkpoints (the hub layout, w1/w2/w3 per expert) to GGUF
    itself: the gguf export's check before loading passes and names the conversion in the
    user cache, with nothing written (tests/test_gguf_moe.py runs the whole export)."""
    from core.export.gguf import gguf_input

    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))
    folder = save_moe(tmp_path / "mixtral", tiny_tokenizer, "mixtral")
    path = gguf_input(RunConfig(model=str(folder), backend="gguf"), convert=False)
    assert path.parent == tmp_path / "cache" / "gguf" / "converted" and path.suffix == ".gguf"
    assert not path.exists()


def test_the_memory_estimate_counts_every_expert(tmp_path):
    """From config.json alone (no weights in the folder): the decoder linears are every
    expert of every layer, and all parameters are those of the fused model."""
    config = moe_config("qwen3_moe", layers=3)
    folder = _config_only(tmp_path / "qwen3_moe", config)
    total, linear, _ = parameter_counts(str(folder))
    assert linear == 3 * layer_weights(config)
    with torch.device("meta"):
        fused = AutoModelForCausalLM.from_config(moe_config("qwen3_moe", layers=3))
    assert total == sum(p.numel() for p in fused.parameters())


def test_the_backends_rules_are_checked_on_the_experts_before_loading(tmp_path):
    """Experts 40 wide: a group of 32 divides the hidden size (64) but not the experts'
    down projections' inputs: refused from the config, with no weights in the folder."""
    from core.backends import get_backend

    config = moe_config("qwen3_moe")
    config.moe_intermediate_size = 40
    folder = _config_only(tmp_path / "qwen3_moe", config)
    with pytest.raises(UserError, match=r"does not divide the 40 input features of model\.layers\.0\.mlp\.experts\.0\.down_proj"):
        check_before_loading(RunConfig(model=str(folder), group_size=32), get_backend("quanto", 32))
