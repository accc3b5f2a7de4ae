"""Hugging Face checkpoints converted to GGUF by impq-tui (core.export.gguf_convert, with
gguf-py), checked by llama.cpp itself (llama-cpp-python, in a fresh process): tiny random
Llama, Qwen2, Qwen3 and Qwen3-MoE checkpoints give llama.cpp the next-token losses
transformers computes on the same tokens, llama.cpp tokenizes text as the Hugging Face
tokenizer does (the pre-tokenizer type chosen from the tokenizer), the Q/K reordering is
the inverse of transformers' own GGUF loader, refusals say what to do, and a whole
`export --backend gguf` of a checkpoint run converts, quantizes and verifies."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import UserError
from core.export.gguf_convert import check_convertible, convert, converted

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the gguf extra) is not installed")
TEXT = ("It's 1999 -- they'll say   \"hello\" 12345 times!\n\nThe  café's naïve résumé: 3.14, "
        "x=y+z; ünïcödé 漢字 and  tabs\tend.  ")


# ------------------------------------------------------------------ llama.cpp in a fresh process

_LLAMA_CPP = textwrap.dedent('''
    import json, sys
    import numpy as np
    import llama_cpp.llama_cpp as capi
    from llama_cpp import Llama

    _default = capi.llama_model_default_params

    def _plain():          # no repacked (AMX) buffers: that path segfaults on this CPU
        params = _default()
        params.use_extra_bufts = False
        return params

    capi.llama_model_default_params = _plain
    job = json.load(open(sys.argv[1]))
    out = {}
    for path, rows, text in job:
        T = len(rows[0]) if rows else 8
        llm = Llama(model_path=path, n_ctx=max(T, 8), n_batch=max(T, 8), n_ubatch=max(T, 8),
                    logits_all=True, n_threads=2, vocab_only=not rows, verbose=False)
        nll = []
        for row in rows:
            llm.reset()
            llm.eval(row)
            logits = np.asarray(llm.scores[:T - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
            nll.append((logz - logits[np.arange(T - 1), row[1:]]).tolist())
        out[path] = {"nll": nll,
                     "plain": llm.tokenize(text.encode(), add_bos=False, special=False),
                     "added": llm.tokenize(text.encode(), add_bos=True, special=False),
                     "meta": dict(llm.metadata)}
    json.dump(out, open(sys.argv[2], "w"))
''')


def llama_cpp(jobs: list[tuple[Path, list[list[int]], str]], tmp_path: Path) -> dict:
    """Per GGUF: llama.cpp's next-token losses on the token rows, its tokenization of the
    text (without and with the special tokens it adds) and its metadata."""
    (tmp_path / "llama_job.json").write_text(json.dumps([[str(p), r, t] for p, r, t in jobs]))
    (tmp_path / "run_llama.py").write_text(_LLAMA_CPP)
    proc = subprocess.run([sys.executable, tmp_path / "run_llama.py", tmp_path / "llama_job.json",
                           tmp_path / "llama_out.json"], capture_output=True, text=True, timeout=600, check=False,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {Path(k): v for k, v in json.loads((tmp_path / "llama_out.json").read_text()).items()}


def transformers_nll(folder: Path, rows: torch.Tensor) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(rows).logits[:, :-1].double(), dim=-1)
    return -logp.gather(-1, rows[:, 1:, None])[..., 0].numpy()


# ------------------------------------------------------------------ tiny checkpoints

def tokenizer_with(pre: str):
    """A byte-level BPE trained as conftest's, split before the byte-level step as the
    family's tokenizer.json splits (gpt-2: conftest's own)."""
    from pydoc_data.topics import topics

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from core.export.gguf_convert import _LLAMA3, _QWEN2

    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))     # as Llama 3's
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre == "gpt-2")
    if pre != "gpt-2":
        split = pre_tokenizers.Split(Regex(_LLAMA3 if pre == "llama-bpe" else _QWEN2),
                                     behavior="isolated", invert=False)
        byte_level = pre_tokenizers.Sequence([split, byte_level])
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>"])
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)


def save_checkpoint(path: Path, tokenizer, model_type: str, *, layers: int = 2, seed: int = 0,
                    shape: dict | None = None, **config_changes) -> Path:
    """A tiny random checkpoint (`shape`: tiny_config's widths), its tokenizer beside it."""
    from core.models import from_config, tiny_config

    config = tiny_config(model_type, layers=layers, vocab=len(tokenizer), **(shape or {}))
    if model_type == "qwen3_moe":
        config.num_experts, config.num_experts_per_tok = 4, 2
        config.moe_intermediate_size, config.norm_topk_prob = 32, True
    for key, value in config_changes.items():
        setattr(config, key, value)
    loaded = from_config(config, torch.device("cpu"), torch.float32, seed=seed)
    loaded.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rows_for(tokenizer, n: int = 2, T: int = 48) -> torch.Tensor:
    ids = tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i * T:(i + 1) * T] for i in range(n)])


# ------------------------------------------------------------------ llama.cpp computes what transformers does

@needs_llama_cpp
def test_converted_checkpoints_give_llama_cpp_the_transformers_losses(tiny_tokenizer, tmp_path, monkeypatch):
    """F32 conversions of tiny Llama (Q/K reordered; Llama 3 rope scaling), Qwen2 (biases;
    YaRN), Qwen3 (q/k norms, head_dim of its own) and Qwen3-MoE (experts stacked): llama.cpp's
    per-token losses on 2 x 48 tokens are transformers'. Weights drawn 10x wider than the
    default (initializer_range 0.2) so that the models are far from uniform: a Llama written
    without the Q/K reordering is off by nats, and each rope scaling moves the loss."""
    import gguf
    from transformers import AutoTokenizer

    from core.export import gguf_convert

    def llama3(factor):
        return {"rope_type": "llama3", "rope_theta": 10000.0, "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    cases = {"llama": ("llama", {}), "llama3-rope": ("llama", {"rope_parameters": llama3(8.0)}),
             "qwen2": ("qwen2", {}), "qwen2-yarn": ("qwen2", {"rope_parameters": yarn}),
             "qwen3": ("qwen3", {}), "qwen3_moe": ("qwen3_moe", {})}
    jobs, want = [], {}
    rows = rows_for(tiny_tokenizer)
    for case, (family, changes) in cases.items():
        folder = save_checkpoint(tmp_path / case, tiny_tokenizer, family, initializer_range=0.2, **changes)
        path = convert(folder, tmp_path / f"{case}.gguf")
        want[path] = transformers_nll(folder, rows)
        jobs.append((path, rows.tolist(), TEXT))
    # the negative control: the Llama without llama.cpp's Q/K order
    monkeypatch.setitem(gguf_convert.FAMILIES, "llama", ("LLAMA", False))
    unordered = convert(tmp_path / "llama", tmp_path / "llama-unordered.gguf")
    jobs.append((unordered, rows.tolist(), TEXT))
    got = llama_cpp(jobs, tmp_path)
    gaps = {}
    for path, nll in want.items():
        llama = np.asarray(got[path]["nll"])
        assert llama.shape == nll.shape
        gaps[path.stem] = float(np.abs(llama - nll).max())
        assert abs(llama.mean() - nll.mean()) < 1e-4 * nll.mean(), (path.stem, llama.mean(), nll.mean())
        # the tokenizer: llama.cpp splits the text as the Hugging Face tokenizer the
        # checkpoint loads with does (for qwen2/3, transformers' Qwen2 class: its own regex)
        hf = AutoTokenizer.from_pretrained(tmp_path / path.stem)
        assert got[path]["plain"] == hf(TEXT, add_special_tokens=False)["input_ids"], path.stem
    assert max(gaps.values()) < 0.02, gaps
    assert np.abs(np.asarray(got[unordered]["nll"]) - want[tmp_path / "llama.gguf"]).max() > 1.0
    for scaled, plain in (("llama3-rope", "llama"), ("qwen2-yarn", "qwen2")):     # the scalings matter
        assert abs(want[tmp_path / f"{scaled}.gguf"].mean() - want[tmp_path / f"{plain}.gguf"].mean()) > 0.01
    reader = gguf.GGUFReader(str(tmp_path / "llama3-rope.gguf"))
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    moe = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "qwen3_moe.gguf")).tensors}
    assert list(moe["blk.0.ffn_gate_exps.weight"].shape) == [64, 32, 4]     # ggml order: in, out, experts


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_as_the_family_tokenizer(pre, tmp_path):
    """Tokenizers split like Llama 3's and Qwen2's (their tokenizer.json regexes): the
    conversion names llama.cpp's pre type, whose splitting gives the same tokens; special
    tokens are control tokens, add_bos as the Hugging Face tokenizer adds it."""
    import gguf

    tokenizer = tokenizer_with(pre)
    family = "llama" if pre == "llama-bpe" else "qwen2"
    folder = save_checkpoint(tmp_path / pre, tokenizer, family, layers=1)
    path = convert(folder, tmp_path / f"{pre}.gguf")
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.get_field(key).contents()
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == pre
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == len(tokenizer) == field(f"{family}.vocab_size")
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokens[special] == "<|im_start|>" and types[special] == gguf.TokenType.CONTROL
    assert types[300] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is False
    assert len(field("tokenizer.ggml.merges")) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"])
    got = llama_cpp([(path, [], TEXT)], tmp_path)[path]
    assert got["plain"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert got["added"] == tokenizer(TEXT)["input_ids"]            # no BOS added by either


def test_q_and_k_rows_are_what_transformers_gguf_loader_undoes(tiny_tokenizer, tmp_path):
    """Llama's q_proj/k_proj in the file, read back through transformers' own
    LlamaTensorProcessor, are the checkpoint's; Qwen2's are stored as they are."""
    import gguf
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    folder = save_checkpoint(tmp_path / "llama", tiny_tokenizer, "llama", layers=1, num_key_value_heads=2)
    path = convert(folder, tmp_path / "llama.gguf")
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    hf = load_file(folder / "model.safetensors")
    processor = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        name = f"blk.0.{ours}.weight"
        original = hf[f"model.layers.0.self_attn.{theirs}.weight"].numpy()
        assert not np.array_equal(stored[name], original)
        assert np.array_equal(processor.process(stored[name], name).weights, original)
    assert np.array_equal(stored["blk.0.attn_v.weight"], hf["model.layers.0.self_attn.v_proj.weight"].numpy())
    qwen = save_checkpoint(tmp_path / "qwen2", tiny_tokenizer, "qwen2", layers=1)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(convert(qwen, tmp_path / "q.gguf"))).tensors}
    hf = load_file(qwen / "model.safetensors")
    assert np.array_equal(stored["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"].numpy())
    assert np.array_equal(stored["blk.0.attn_q.bias"], hf["model.layers.0.self_attn.q_proj.bias"].numpy())


def test_metadata_and_types_follow_the_config_and_the_run_dtype(tiny_tokenizer, tmp_path):
    import gguf

    folder = save_checkpoint(tmp_path / "qwen3", tiny_tokenizer, "qwen3", layers=2,
                             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    reader = gguf.GGUFReader(str(convert(folder, tmp_path / "a.gguf", dtype="bfloat16")))
    field = lambda key: reader.get_field(key).contents()
    config = json.loads((folder / "config.json").read_text())
    assert field("general.architecture") == "qwen3"
    assert field("qwen3.block_count") == 2 and field("qwen3.embedding_length") == 64
    assert field("qwen3.feed_forward_length") == 128 and field("qwen3.context_length") == 4096
    assert field("qwen3.attention.head_count") == 4 and field("qwen3.attention.head_count_kv") == 2
    assert field("qwen3.attention.key_length") == config["head_dim"] == field("qwen3.attention.value_length")
    assert field("qwen3.rope.freq_base") == 5e5
    assert field("qwen3.rope.scaling.type") == "linear" and field("qwen3.rope.scaling.factor") == 2.0
    assert field("qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["output.weight"] == "BF16"                        # untied: its own head
    # bf16 values exactly as torch rounds them when the run loads the checkpoint in bfloat16
    from safetensors.torch import load_file

    q = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    want = load_file(folder / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16)
    assert np.array_equal(np.asarray(q.data).view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))


def test_the_conversion_is_cached_by_the_checkpoints_fingerprint(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))
    folder = save_checkpoint(tmp_path / "m", tiny_tokenizer, "llama", layers=1)
    first = converted(folder)
    assert first.is_file() and first.parent == tmp_path / "cache" / "gguf" / "converted"
    stamp = first.stat().st_mtime_ns
    assert converted(folder) == first and first.stat().st_mtime_ns == stamp       # not converted again
    assert converted(folder, "bfloat16") != first                                 # another dtype, another file
    save_checkpoint(folder, tiny_tokenizer, "llama", layers=1, seed=1)            # other weights
    assert converted(folder) != first


# ------------------------------------------------------------------ refusals

def test_what_cannot_be_converted_is_refused_with_llama_cpps_converter_named(tiny_tokenizer, tmp_path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def refused(folder: Path, match: str):
        with pytest.raises(UserError, match=match) as info:
            check_convertible(folder)
        assert "convert_hf_to_gguf.py" in str(info.value) and f"{folder}.gguf" in str(info.value)

    # a SentencePiece-style tokenizer.json (Llama 2, Mistral 7B: BPE with byte fallback)
    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    spm.normalizer = normalizers.Replace(" ", "▁")
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    folder = save_checkpoint(tmp_path / "spm", PreTrainedTokenizerFast(tokenizer_object=spm), "llama", layers=1,
                             vocab_size=8)
    refused(folder, "byte fallback")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x00")
    refused(folder, "SentencePiece model")
    # a byte-level BPE whose pre-tokenizer llama.cpp has no type for
    odd = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    odd.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel()])
    folder = save_checkpoint(tmp_path / "odd", PreTrainedTokenizerFast(tokenizer_object=odd), "llama", layers=1)
    refused(folder, "pre-tokenizer")
    # families and rope scalings it does not convert
    refused(save_checkpoint(tmp_path / "phi3", tiny_tokenizer, "phi3", layers=1), "phi3")
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    refused(save_checkpoint(tmp_path / "dyn", tiny_tokenizer, "llama", layers=1, rope_parameters=dynamic),
            "'dynamic'")


# ------------------------------------------------------------------ the whole export

ROOT = Path(__file__).resolve().parent.parent


@needs_llama_cpp
def test_export_of_a_checkpoint_run_converts_quantizes_and_verifies(tiny_tokenizer, tmp_path, monkeypatch):
    """A gguf run on a tiny Hugging Face Llama checkpoint (widths 256/512: K-quants apply),
    exported with a Q3_K and a Q5_K layer: the checkpoint is converted into the user cache,
    llama.cpp's quantize writes the simulated bytes, and llama.cpp runs the file at the
    simulated perplexity (`verify`)."""
    import os

    import gguf

    from core.export import export_model
    from core.runs import RunDir

    checkpoint = save_checkpoint(tmp_path / "tiny-hf", tiny_tokenizer, "llama",
                                 shape={"hidden": 256, "intermediate": 512})
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "impq_tui", "run", "--model", str(checkpoint), "--backend", "gguf",
         "--gguf-types", "Q3_K", "Q5_K", "--samples", "1", "--windows", "2", "--window-tokens", "16",
         "--device", "cpu", "--quiet", "--run-dir", str(run)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "export"
    result = export_model(RunDir.open(run), [2, 4], "gguf", str(out), verify=True, eval_windows=2,
                          eval_window_tokens=32)
    record = json.loads((out / "allocation.json").read_text())
    source = Path(record["quantization"]["source"])
    assert source.parent == tmp_path / "cache" / "gguf" / "converted" and source.suffix == ".gguf"
    assert not list(checkpoint.glob("*.gguf"))               # the checkpoint folder stays as it was
    types = record["quantization"]["types_by_tensor"]
    for layer, want in ((0, "Q3_K"), (1, "Q5_K")):
        assert {t for n, t in types.items() if n.startswith(f"blk.{layer}.")
                and not n.endswith("norm.weight")} == {want}
    assert record["quantization"]["identical_tensors"] == 14  # the bytes the simulation used
    stored = gguf.GGUFReader(str(out / "model.gguf"))
    assert stored.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert len(stored.get_field("tokenizer.ggml.tokens").contents()) == len(tiny_tokenizer)
    # llama.cpp ran the export on the evaluation tokens, at the simulated perplexity
    assert result.ppl_reloaded is not None and result.ppl is not None
    assert abs(result.ppl_reloaded - result.ppl) / result.ppl < 0.01, (result.ppl, result.ppl_reloaded)
