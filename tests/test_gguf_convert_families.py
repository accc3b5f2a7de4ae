"""The families impq-tui converts to GGUF beyond Llama and Qwen (core.export.gguf_convert),
checked by llama.cpp itself as tests/test_gguf_convert.py checks those: tiny random Gemma 2,
Gemma 3, Phi-3 (plain and with LongRoPE, its short and its long factors), OLMo 2, Granite,
StableLM, StarCoder2 and GPT-NeoX checkpoints converted to F32 give llama.cpp
(llama-cpp-python, in a fresh process) the next-token losses transformers computes on the
same tokens; what each family needs written differently matters (written without it,
llama.cpp is off); each decoder linear of the fused families is one tensor of the file for
the export; and a gguf run on a Phi-3 checkpoint (fused qkv_proj and gate_up_proj) exports,
quantizes and verifies."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from test_gguf_convert import (TEXT, convert, llama_cpp, needs_llama_cpp, rows_for, run_and_export,
                               save_checkpoint, spm_checkpoint, transformers_nll)

PHI_SPECIAL = ("<|endoftext|>", "<|end|>")     # Phi-3's; llama.cpp looks them up for a model named phi3
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16, "tie_word_embeddings": True}
GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
GRANITE = {"embedding_multiplier": 6.0, "attention_multiplier": 0.03, "residual_multiplier": 0.3,
           "logits_scaling": 4.0}


def longrope(pairs: int, original: int, **more) -> dict:
    """Phi-3's LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) stretching `original`
    positions four times, its long and short factors random in [1, 8] (far from 1), one per
    rotated pair. transformers takes original_max_position_embeddings from the config's top
    level: both say it."""
    rng = np.random.default_rng(pairs + original)
    return {"max_position_embeddings": 4 * original, "original_max_position_embeddings": original,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 1.0,
                                "original_max_position_embeddings": original,
                                "long_factor": rng.uniform(1, 8, pairs).tolist(),
                                "short_factor": rng.uniform(1, 8, pairs).tolist(), **more}}


# case: (model_type, tokenizer: a SentencePiece style of spm_checkpoint or conftest's byte-level
# BPE, changes to tiny_config)
CASES = {
    # norms stored plus one, embeddings scaled, attention and final soft caps, every other
    # layer sliding (a window of 16 in 48 tokens), a Gemma SentencePiece vocabulary
    "gemma2": ("gemma2", "gemma", GEMMA),
    # q/k norms, five sliding layers then a global one whose rope alone is scaled (linear x8)
    "gemma3": ("gemma3_text", "gemma", {**GEMMA, "layers": 6, "rope_parameters": {
        **GEMMA3_ROPE, "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}),
    # layer types off llama.cpp's pattern (written per layer), sliding layers' own rope base
    "gemma3-layers": ("gemma3_text", "gemma", {**GEMMA, "layers": 4, "layer_types": LAYER_TYPES,
                                               "rope_parameters": {**GEMMA3_ROPE, "sliding_attention": {
                                                   "rope_type": "default", "rope_theta": 100.0}}}),
    # fused qkv_proj and gate_up_proj, Llama's SentencePiece vocabulary with Phi-3's tokens
    "phi3": ("phi3", "llama-json", {"special": PHI_SPECIAL}),
    # Phi-4-mini: 3/4 of each head rotated
    "phi4-mini": ("phi3", "bpe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                      "partial_rotary_factor": 0.75}}),
    # LongRoPE, 48 tokens within the original 256: transformers' short factors, and llama.cpp's
    # (its context of 48 is padded to 256, not longer); attention scaled for 1024/256
    "phi3-longrope": ("phi3", "llama-json", {"special": PHI_SPECIAL, **longrope(8, 256)}),
    # past the original 32: the long factors in both; 3/4 of each head rotated, an attention factor given
    "phi4-mini-longrope": ("phi3", "bpe", longrope(6, 32, partial_rotary_factor=0.75, attention_factor=1.3)),
    "olmo2": ("olmo2", "bpe", {}),
    "granite": ("granite", "bpe", GRANITE),                       # its four multipliers
    "stablelm": ("stablelm", "bpe", {"use_qkv_bias": True}),       # a quarter rotated, LayerNorm
    "stablelm-parallel": ("stablelm", "bpe", {"use_parallel_residual": True}),
    "starcoder2": ("starcoder2", "bpe", {}),                       # biases, GELU, LayerNorm
    # fused query_key_value reordered, parallel residual, Pythia's exact GELU (llama.cpp: tanh)
    "gpt_neox": ("gpt_neox", "bpe", {}),
    "gpt_neox-sequential": ("gpt_neox", "bpe", {"use_parallel_residual": False}),
}


def checkpoint(tmp_path: Path, case: str, tiny_tokenizer, **more):
    """The case's tiny checkpoint (weights 10x wider than the default: far from uniform),
    and the tokenizer transformers loads for it."""
    model_type, vocab, changes = CASES[case]
    changes = {"initializer_range": 0.2, "layers": 2, **changes, **more}
    if vocab == "bpe":
        return save_checkpoint(tmp_path / case, tiny_tokenizer, model_type, **changes), tiny_tokenizer
    return spm_checkpoint(tmp_path / case, vocab, model_type, **changes)


@needs_llama_cpp
def test_each_family_gives_llama_cpp_the_transformers_losses(tiny_tokenizer, tmp_path, monkeypatch):
    """F32 conversions: llama.cpp's per-token losses on 2 x 48 tokens are transformers'
    (mean within 1e-4 relative), and llama.cpp tokenizes as the Hugging Face tokenizer.
    Negative controls, in the same llama.cpp process: Gemma 2's norms stored as they are,
    GPT-NeoX's query_key_value rows in Hugging Face's order, Granite written as a Llama
    (no multipliers), LongRoPE's long and short factors swapped are off by much more."""
    from core.export import gguf_convert

    def swapped(config, rope=gguf_convert._rope):
        params = rope(config)
        if params.get("rope_type") == "longrope":
            params["long_factor"], params["short_factor"] = params["short_factor"], params["long_factor"]
        return params

    jobs, want, tokenizers = [], {}, {}
    for case in CASES:
        folder, tokenizer = checkpoint(tmp_path, case, tiny_tokenizer)
        path = convert(folder, tmp_path / f"{case}.gguf")
        rows = rows_for(tokenizer)
        want[path], tokenizers[path] = transformers_nll(folder, rows), tokenizer
        jobs.append((path, rows.tolist(), TEXT))
    controls = {}
    with monkeypatch.context() as patch:
        patch.setitem(gguf_convert.FAMILIES, "gemma2", gguf_convert.Family(
            "GEMMA2", activations=gguf_convert._GELU_TANH))
        patch.setattr(gguf_convert, "_to_ggml_qkv_order", lambda w, n_head: w)
        patch.setitem(gguf_convert.FAMILIES, "granite", gguf_convert.Family("LLAMA", rope_order=True))
        patch.setattr(gguf_convert, "_rope", swapped)
        for case in ("gemma2", "gpt_neox", "granite", "phi3-longrope", "phi4-mini-longrope"):
            controls[case] = convert(tmp_path / case, tmp_path / f"{case}-control.gguf")
            jobs.append((controls[case], next(r for p, r, _ in jobs if p.stem == case), TEXT))
    got = llama_cpp(jobs, tmp_path)
    gaps = {}
    for path, nll in want.items():
        llama = np.asarray(got[path]["nll"])
        gaps[path.stem] = float(np.abs(llama - nll).max())
        assert abs(llama.mean() - nll.mean()) < 1e-4 * nll.mean(), (path.stem, llama.mean(), nll.mean())
        assert got[path]["plain"] == tokenizers[path](TEXT, add_special_tokens=False)["input_ids"], path.stem
    assert max(gaps.values()) < 0.02, gaps
    for case, path in controls.items():
        off = np.abs(np.asarray(got[path]["nll"]) - want[tmp_path / f"{case}.gguf"])
        assert off.max() > 0.2, (case, off.max())


def test_what_the_families_need_changes_the_model(tiny_tokenizer, tmp_path):
    """What the conversion carries is not idle in these tiny models: transformers' own
    losses move when Gemma 2's window, Gemma 3's global rope scaling, its layer types and
    sliding rope base, Phi-4-mini's partial rope or Granite's multipliers are taken away."""
    without = {"gemma2": {"sliding_window": 4096},
               "gemma3": {"rope_parameters": GEMMA3_ROPE},
               "gemma3-layers": {"layer_types": ["sliding_attention"] * 4, "rope_parameters": GEMMA3_ROPE},
               "phi4-mini": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 1.0}},
               "granite": {k: 1.0 for k in GRANITE}}
    for case, plain in without.items():
        folder, tokenizer = checkpoint(tmp_path, case, tiny_tokenizer)
        other, _ = checkpoint(tmp_path / "without", case, tiny_tokenizer, **plain)
        rows = rows_for(tokenizer)
        assert np.abs(transformers_nll(folder, rows) - transformers_nll(other, rows)).max() > 0.01, case


def test_each_linear_of_the_fused_families_is_one_tensor_of_the_file(tiny_tokenizer, tmp_path):
    """The export's mapping (core.export.gguf.tensor_names): Phi-3's qkv_proj and
    gate_up_proj stay fused as attn_qkv and ffn_up, GPT-NeoX's query_key_value as attn_qkv
    (its rows reordered: the same rows, as the export compares them), each linear one
    tensor and each tensor one linear."""
    import gguf
    from safetensors.torch import load_file

    from core.export.gguf import tensor_names
    from core.models import load_model

    want = {"phi3": {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
                     "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
            "gpt_neox": {"attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
                         "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}}
    for case, parts in want.items():
        folder, _ = checkpoint(tmp_path, case, tiny_tokenizer, layers=1)
        path = convert(folder, tmp_path / f"{case}.gguf")
        linears = load_model(str(folder), torch.device("cpu"), torch.float32).linear_names
        names = tensor_names(path, linears)
        prefix = "gpt_neox.layers.0." if case == "gpt_neox" else "model.layers.0."
        assert names == {prefix + hf: f"blk.0.{ours}.weight" for hf, ours in parts.items()}
        stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
        weights = load_file(folder / "model.safetensors")
        for hf, tensor in names.items():
            rows = lambda a: np.sort(np.ascontiguousarray(a).view(f"V{a.shape[1] * 4}").ravel())  # noqa: E731
            assert np.array_equal(rows(stored[tensor]), rows(weights[f"{hf}.weight"].numpy())), hf
    qkv = weights["gpt_neox.layers.0.attention.query_key_value.weight"].numpy()
    assert not np.array_equal(stored["blk.0.attn_qkv.weight"], qkv)          # reordered, not copied
    # two linears on one tensor (gguf-py's map knows Phi-3's name for GPT-NeoX's too): refused
    with pytest.raises(UserError, match="both map to blk.0.attn_qkv.weight"):
        tensor_names(path, [["gpt_neox.layers.0.attention.query_key_value", "model.layers.0.self_attn.qkv_proj"]])


@needs_llama_cpp
def test_export_of_a_phi3_checkpoint_run_keeps_its_fused_linears(tiny_tokenizer, tmp_path, monkeypatch):
    """A gguf run on a tiny Phi-3 checkpoint (widths 256/512: K-quants apply), exported with a
    Q3_K and a Q5_K layer: qkv_proj and gate_up_proj quantized fused, as the run measured
    them, every tensor the simulation's bytes, llama.cpp at the simulated perplexity."""
    checkpoint_dir = save_checkpoint(tmp_path / "tiny-phi", tiny_tokenizer, "phi3",
                                     shape={"hidden": 256, "intermediate": 512})
    result, record, _ = run_and_export(checkpoint_dir, tmp_path, monkeypatch)
    types = record["quantization"]["types_by_tensor"]
    for layer, want in ((0, "Q3_K"), (1, "Q5_K")):
        assert types[f"blk.{layer}.attn_qkv.weight"] == types[f"blk.{layer}.ffn_up.weight"] == want
        assert f"blk.{layer}.ffn_gate.weight" not in types
    assert record["quantization"]["identical_tensors"] == 8     # 4 linears a layer, each byte-identical
    assert abs(result.ppl_reloaded - result.ppl) / result.ppl < 0.01, (result.ppl, result.ppl_reloaded)
