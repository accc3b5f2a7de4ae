"""Hugging Face checkpoints converted to GGUF by impq-tui (core.export.gguf_convert, with
gguf-py), checked by llama.cpp itself (llama-cpp-python, in a fresh process): tiny random
Llama, Qwen2, Qwen3, Qwen3-MoE and Mixtral checkpoints give llama.cpp the next-token losses
transformers computes on the same tokens, llama.cpp tokenizes text as the Hugging Face
tokenizer does (byte-level BPE: the pre-tokenizer type chosen from the tokenizer;
SentencePiece BPE from tokenizer.model or tokenizer.json: llama.cpp's "llama" tokenizer
with scores it merges by), the Q/K reordering is the inverse of transformers' own GGUF
loader, refusals say what to do, and a whole `export --backend gguf` of a checkpoint run
converts, quantizes and verifies. The other families: tests/test_gguf_convert_families.py."""
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

    from core.export.gguf_vocab import _LLAMA3, _QWEN2

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
    """A tiny random checkpoint as transformers saves one (`shape`: tiny_config's widths;
    MoE families: four experts, two per token), its tokenizer beside it. Saved from the
    fused model: Mixtral's experts then go to the hub layout (block_sparse_moe.experts.E.w1,
    w2, w3), Qwen3-MoE's to per-expert gate_proj, up_proj, down_proj."""
    from transformers import AutoModelForCausalLM

    from core.models import seeded, tiny_config

    config = tiny_config(model_type, layers=layers, vocab=len(tokenizer), **(shape or {}))
    if model_type == "qwen3_moe":
        config.num_experts, config.num_experts_per_tok = 4, 2
        config.moe_intermediate_size, config.norm_topk_prob = 32, True
    if model_type == "mixtral":
        config.num_local_experts, config.num_experts_per_tok = 4, 2
    for key, value in config_changes.items():
        setattr(config, key, value)
    with seeded(seed):      # not the global generator as other threads leave it
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def rows_for(tokenizer, n: int = 2, T: int = 48) -> torch.Tensor:
    ids = tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[i * T:(i + 1) * T] for i in range(n)])


# ------------------------------------------------------------------ llama.cpp computes what transformers does

@needs_llama_cpp
def test_converted_checkpoints_give_llama_cpp_the_transformers_losses(tiny_tokenizer, tmp_path, monkeypatch):
    """F32 conversions of tiny Llama (Q/K reordered; Llama 3 rope scaling), Qwen2 (biases;
    YaRN), Qwen3 (q/k norms, head_dim of its own), Qwen3-MoE (experts stacked) and Mixtral
    (Q/K reordered, experts stacked from the hub layout's w1, w2, w3): llama.cpp's per-token
    losses on 2 x 48 tokens are transformers'. Weights drawn 10x wider than the
    default (initializer_range 0.2) so that the models are far from uniform: a Llama written
    without the Q/K reordering and a Mixtral with w1 and w3 taken the other way round (gate
    for up) are off by nats, and each rope scaling moves the loss."""
    import gguf
    from transformers import AutoTokenizer

    from core.export import gguf_convert

    def llama3(factor):
        return {"rope_type": "llama3", "rope_theta": 10000.0, "factor": factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    cases = {"llama": ("llama", {}), "llama3-rope": ("llama", {"rope_parameters": llama3(8.0)}),
             "qwen2": ("qwen2", {}), "qwen2-yarn": ("qwen2", {"rope_parameters": yarn}),
             "qwen3": ("qwen3", {}), "qwen3_moe": ("qwen3_moe", {}), "mixtral": ("mixtral", {})}
    jobs, want = [], {}
    rows = rows_for(tiny_tokenizer)
    for case, (family, changes) in cases.items():
        folder = save_checkpoint(tmp_path / case, tiny_tokenizer, family, initializer_range=0.2, **changes)
        path = convert(folder, tmp_path / f"{case}.gguf")
        want[path] = transformers_nll(folder, rows)
        jobs.append((path, rows.tolist(), TEXT))
    # the negative controls: the Llama without llama.cpp's Q/K order, Mixtral's gate and up swapped
    monkeypatch.setitem(gguf_convert.FAMILIES, "llama", gguf_convert.Family("LLAMA"))
    unordered = convert(tmp_path / "llama", tmp_path / "llama-unordered.gguf")
    monkeypatch.setattr(gguf_convert, "_MIXTRAL_PROJECTIONS", {"w1": "up", "w2": "down", "w3": "gate"})
    swapped = convert(tmp_path / "mixtral", tmp_path / "mixtral-swapped.gguf")
    jobs += [(unordered, rows.tolist(), TEXT), (swapped, rows.tolist(), TEXT)]
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
    assert np.abs(np.asarray(got[swapped]["nll"]) - want[tmp_path / "mixtral.gguf"]).max() > 1.0
    for scaled, plain in (("llama3-rope", "llama"), ("qwen2-yarn", "qwen2")):     # the scalings matter
        assert abs(want[tmp_path / f"{scaled}.gguf"].mean() - want[tmp_path / f"{plain}.gguf"].mean()) > 0.01
    reader = gguf.GGUFReader(str(tmp_path / "llama3-rope.gguf"))
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}
    moe = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "qwen3_moe.gguf")).tensors}
    assert list(moe["blk.0.ffn_gate_exps.weight"].shape) == [64, 32, 4]     # ggml order: in, out, experts
    reader = gguf.GGUFReader(str(tmp_path / "mixtral.gguf"))
    mixtral = {t.name: t for t in reader.tensors}
    for stack in ("ffn_gate_exps", "ffn_up_exps"):
        assert list(mixtral[f"blk.0.{stack}.weight"].shape) == [64, 128, 4]
    assert list(mixtral["blk.0.ffn_down_exps.weight"].shape) == [128, 64, 4]
    assert mixtral["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"     # the router
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("llama.expert_count").contents() == 4
    assert reader.get_field("llama.expert_used_count").contents() == 2


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


# ------------------------------------------------------------------ SentencePiece vocabularies

SPM_STYLES = {   # style: (sentencepiece ids and pieces, a space prefixed, user-defined token)
    "llama": ({"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}, True, "<sep>"),
    "gemma": ({"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>",
               "eos_piece": "<eos>", "bos_piece": "<bos>"}, False, "<start_of_turn>"),
}


def spm_checkpoint(path: Path, style: str, family: str = "llama", special: tuple[str, ...] = (), **changes):
    """A tiny checkpoint whose tokenizer is a SentencePiece BPE trained on the embedded text
    (byte fallback, no normalization, digits split: as Llama 2's and Gemma's), given as:
    "llama" and "gemma" tokenizer.model (Llama's ids and space prefix; Gemma's ids, none),
    "llama-json" the tokenizer.json transformers writes for it alone (a Metaspace), and
    "llama2-json" that file with Llama 2's own normalizer (Prepend and Replace) read as a
    plain tokenizers tokenizer (`special`: control tokens added after its pieces). The
    checkpoint's family decides how transformers builds a tokenizer.model: Llama's class
    (a Metaspace), Gemma's, or its generic build (Mistral, Phi-3...: Replace, Metaspace,
    user-defined pieces split off). (the folder, the tokenizer transformers loads from it)"""
    import io
    import shutil

    import sentencepiece
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    ids, prefix, user = SPM_STYLES["gemma" if style == "gemma" else "llama"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([topics[k] for k in sorted(topics)]), model_writer=model,
        vocab_size=512, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, add_dummy_prefix=prefix,
        allow_whitespace_only_pieces=True, user_defined_symbols=[user], max_sentence_length=100000,
        minloglevel=2, **ids)
    source = path.parent / f"{path.name}-tokenizer"
    source.mkdir(parents=True)
    (source / "tokenizer.model").write_bytes(model.getvalue())
    names = ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"} if style == "gemma"
             else {"bos_token": "<s>", "eos_token": "</s>"})
    (source / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer" if style == "gemma" else "LlamaTokenizer",
         "unk_token": "<unk>", "add_bos_token": True, **names}))
    if style.endswith("-json"):
        spec = json.loads(AutoTokenizer.from_pretrained(source).backend_tokenizer.to_str())
        (source / "tokenizer.model").unlink()
        if style == "llama2-json":
            spec["normalizer"] = {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
            spec["pre_tokenizer"] = None
            config = json.loads((source / "tokenizer_config.json").read_text())
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            (source / "tokenizer_config.json").write_text(json.dumps(config))
        (source / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if special:
        assert style.endswith("-json"), "added tokens are kept in a tokenizer.json"
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    save_checkpoint(path, tokenizer, family, **changes)
    if not style.endswith("-json"):       # the tokenizer.model alone
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (path / name).unlink(missing_ok=True)
        for file in source.iterdir():
            shutil.copy(file, path)
    return path, AutoTokenizer.from_pretrained(path)


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_sentencepiece_tokenizers(tmp_path, monkeypatch):
    """SentencePiece BPE vocabularies (tokenizer.model, or a tokenizer.json BPE with byte
    fallback; as Llama's class, Gemma's and transformers' generic build for Mistral read
    them) become llama.cpp's "llama" tokenizer: llama.cpp splits text (spaces, digits,
    accents, CJK and a tab through byte fallback; Gemma's user-defined token) into the ids
    the Hugging Face tokenizer gives, adds BOS as it does, and the tiny models run at the
    transformers losses. From a tokenizer.json alone the scores come from its merges: with
    llama.cpp's converter's -1000 for every token the split differs."""
    import gguf

    from core.export import gguf_vocab

    jobs, want, tokenizers = [], {}, {}
    for style, family in (("llama", "llama"), ("gemma", "llama"), ("llama-json", "llama"),
                          ("llama2-json", "llama"), ("mistral", "mistral")):
        folder, tokenizer = spm_checkpoint(tmp_path / style, "llama" if style == "mistral" else style,
                                           family, layers=1, initializer_range=0.2)
        path = convert(folder, tmp_path / f"{style}.gguf")
        rows = rows_for(tokenizer)
        want[path], tokenizers[path] = transformers_nll(folder, rows), tokenizer
        text = TEXT + ("<start_of_turn>user\n" if style == "gemma" else "")
        jobs.append((path, rows.tolist(), text))
        field = lambda key, reader=gguf.GGUFReader(str(path)): reader.get_field(key).contents()  # noqa: E731
        assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.pre") == "default"
        assert field("tokenizer.ggml.add_space_prefix") is (style != "gemma")
        assert field("tokenizer.ggml.add_bos_token") is True
        assert field("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
        tokens, types, scores = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "token_type", "scores"))
        assert len(tokens) == len(tokenizer)
        assert types[tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
        assert types[tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN
        assert types[tokenizer.bos_token_id] == gguf.TokenType.CONTROL
        user = SPM_STYLES["gemma" if style == "gemma" else "llama"][2]
        assert types[tokenizer.convert_tokens_to_ids(user)] == gguf.TokenType.USER_DEFINED
        the = tokenizer.convert_tokens_to_ids("▁the")
        assert types[the] == gguf.TokenType.NORMAL and scores[the] > scores[tokenizer.convert_tokens_to_ids("▁they")]
    # llama.cpp's converter's scores for a tokenizer.json (gguf-py's LlamaHfVocab): all -1000
    monkeypatch.setattr(gguf_vocab, "_scores",
                        lambda tokenizer, spec, folder: dict.fromkeys(tokenizer.get_vocab().values(), -1000.0))
    flat = convert(tmp_path / "llama-json", tmp_path / "flat.gguf")
    got = llama_cpp(jobs + [(flat, [], TEXT)], tmp_path)
    gaps = {}
    for path, text in ((p, t) for p, _, t in jobs):
        tokenizer = tokenizers[path]
        assert got[path]["plain"] == tokenizer(text, add_special_tokens=False)["input_ids"], path.stem
        assert got[path]["added"] == tokenizer(text)["input_ids"], path.stem
        llama, nll = np.asarray(got[path]["nll"]), want[path]
        gaps[path.stem] = float(np.abs(llama - nll).max())
        assert abs(llama.mean() - nll.mean()) < 1e-4 * nll.mean(), (path.stem, llama.mean(), nll.mean())
    assert max(gaps.values()) < 0.02, gaps
    assert got[flat]["plain"] != tokenizers[tmp_path / "llama-json.gguf"](TEXT, add_special_tokens=False)["input_ids"]


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

def config_only(path: Path, model_type: str, **changes) -> Path:
    """A checkpoint folder with a config.json and nothing else: a refusal from it was decided
    before any tokenizer file or weight was read."""
    from core.models import seeded, tiny_config

    config = tiny_config(model_type, layers=2)
    for key, value in changes.items():
        setattr(config, key, value)
    path.mkdir()
    config.save_pretrained(path)
    return path


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64}


@pytest.mark.parametrize("model_type, changes, words", [
    ("qwen2_moe", {}, "is a qwen2_moe"),
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "'dynamic'"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("llama", {"max_position_embeddings": 256, "rope_parameters": LONGROPE}, "'longrope'"),   # Phi-3's only
    ("gemma2", {}, "tie_word_embeddings false"),
    ("gemma2", {"tie_word_embeddings": True, "head_dim": 16}, "query_pre_attn_scalar 256"),
    ("gemma2", {"tie_word_embeddings": True, "final_logit_softcapping": None}, "soft-capping"),
    ("gemma2", {"tie_word_embeddings": True, "sliding_window": None}, "no sliding window"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "soft-caps attention"),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e4}}},
     "scales the rope of its sliding layers"),
    ("stablelm", {"qk_layernorm": True}, "qk_layernorm"),
])
def test_families_llama_cpp_would_compute_otherwise_are_refused_from_the_config(model_type, changes, words,
                                                                                tmp_path):
    """Families impq-tui does not convert, and settings with which llama.cpp's architecture
    would compute something else than transformers: refused from config.json alone, with
    llama.cpp's converter as the way to go."""
    folder = config_only(tmp_path / model_type, model_type, **changes)
    with pytest.raises(UserError, match=words) as info:
        check_convertible(folder)
    assert f"convert_hf_to_gguf.py {folder} --outtype f32 --outfile {folder}.gguf" in str(info.value)


def test_tokenizers_llama_cpp_would_split_otherwise_are_refused(tiny_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def refused(folder: Path, match: str):
        with pytest.raises(UserError, match=match) as info:
            check_convertible(folder)
        assert "convert_hf_to_gguf.py" in str(info.value) and f"{folder}.gguf" in str(info.value)

    # a SentencePiece-style tokenizer normalizing beyond spaces (NFKC): llama.cpp does not
    folder, _ = spm_checkpoint(tmp_path / "nfkc", "llama2-json", layers=1)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"]["normalizers"].insert(0, {"type": "NFKC"})
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    refused(folder, "normalization")
    # a tokenizer.model that is not the tokenizer transformers loads (from tokenizer.json)
    folder, _ = spm_checkpoint(tmp_path / "mixed", "llama-json", layers=1)
    other, _ = spm_checkpoint(tmp_path / "gemma", "gemma", layers=1)
    (folder / "tokenizer.model").write_bytes((other / "tokenizer.model").read_bytes())
    with pytest.raises(UserError, match="disagree on token 4"):
        check_convertible(folder)
    # a Unigram model (T5's kind): llama.cpp's llama tokenizer merges pairs, it does not
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefgh▁"], unk_id=0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    folder = save_checkpoint(tmp_path / "unigram", PreTrainedTokenizerFast(tokenizer_object=unigram,
                                                                          unk_token="<unk>"), "llama", layers=1)
    refused(folder, "a Unigram model")
    # a byte-level BPE whose pre-tokenizer llama.cpp has no type for
    odd = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    odd.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel()])
    folder = save_checkpoint(tmp_path / "odd", PreTrainedTokenizerFast(tokenizer_object=odd), "llama", layers=1)
    refused(folder, "pre-tokenizer")
    # no tokenizer at all
    (folder / "tokenizer.json").unlink()
    refused(folder, "no tokenizer")
    # a model named like Phi-3 whose vocabulary lacks the tokens llama.cpp then looks up
    folder = save_checkpoint(tmp_path / "phi3-mini", tiny_tokenizer, "phi3", layers=1)
    with pytest.raises(UserError, match=r"Phi-3's tokens \['</s>', '<unk>', '<s>', '<\|endoftext\|>'\]"):
        check_convertible(folder)


# ------------------------------------------------------------------ the whole export

ROOT = Path(__file__).resolve().parent.parent


def run_and_export(checkpoint: Path, tmp_path: Path, monkeypatch):
    """A 1-sample gguf run (Q3_K / Q5_K) on `checkpoint`, converted into a user cache under
    tmp_path, exported with layer 0 low and layer 1 high and verified by llama.cpp: the
    export's result, its allocation.json and its folder."""
    import os

    from core.export import export_model
    from core.runs import RunDir

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
    return result, json.loads((out / "allocation.json").read_text()), out


@needs_llama_cpp
def test_export_of_a_checkpoint_run_converts_quantizes_and_verifies(tiny_tokenizer, tmp_path, monkeypatch):
    """A gguf run on a tiny Hugging Face Llama checkpoint (widths 256/512: K-quants apply),
    exported with a Q3_K and a Q5_K layer: the checkpoint is converted into the user cache,
    llama.cpp's quantize writes the simulated bytes, and llama.cpp runs the file at the
    simulated perplexity (`verify`)."""
    import gguf

    checkpoint = save_checkpoint(tmp_path / "tiny-hf", tiny_tokenizer, "llama",
                                 shape={"hidden": 256, "intermediate": 512})
    result, record, out = run_and_export(checkpoint, tmp_path, monkeypatch)
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
