"""GGUF inputs (core.models): the families of issue 14 written as llama.cpp's converter
writes them (gguf-py's writer, llama.cpp's tensor names, metadata keys and tensor
transforms; a byte-level BPE or a SentencePiece vocabulary with scores and token types),
loaded through transformers' GGUF reader to the logits of the Hugging Face model written,
and run end to end. Header values transformers leaves at its defaults are read in (rope
scaling, partial rotary, sliding window, Gemma's attention scale); families transformers
cannot read from GGUF are refused from the header, before any tensor is read."""
from __future__ import annotations

import importlib.util
import io
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.engine import run_spqe
from core.errors import UserError
from core.models import load_model, seeded, structure_of, tiny_config
from core.runs import RunConfig, RunDir

HIDDEN, LAYERS, EXPERTS, EXPERT_WIDTH = 64, 2, 4, 32

TEXT = "The import statement,\n2024 times: x = [a for a in range(10)]  # déjà vu."
# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6


@dataclass(frozen=True)
class Family:
    model_type: str
    arch: str                      # llama.cpp's architecture name
    vocab: str                     # "bpe" (byte-level: gpt2), "spm" or "gemma-spm" (SentencePiece: llama)
    layers: int = LAYERS
    config: dict = field(default_factory=dict)      # changes to tiny_config
    name: str = ""                 # general.name
    special: tuple[str, ...] = ()  # control tokens the family's vocabulary adds (llama.cpp needs Phi's)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
PHI_SPECIAL = ("<|endoftext|>", "<|end|>")
SHORT, LONG = [1.0, 1.125, 1.25, 1.5, 2.0, 2.5], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]   # float32-exact
FAMILIES = {
    # Llama 3.2: tied embeddings, Llama 3's rope scaling (llama.cpp: a rope_freqs tensor);
    # head_dim 64 puts three frequencies in the scaling's smooth band
    "llama": Family("llama", "llama", "bpe", config={
        "num_attention_heads": 1, "num_key_value_heads": 1, "tie_word_embeddings": True,
        "rope_parameters": LLAMA3_ROPE}),
    # Mistral 7B v0.3: llama.cpp's llama architecture, a SentencePiece vocabulary
    "mistral": Family("mistral", "llama", "spm", config={"sliding_window": None},
                      name="Mistral 7B Instruct v0.3"),
    "qwen2": Family("qwen2", "qwen2", "bpe"),
    "qwen3": Family("qwen3", "qwen3", "bpe"),
    "qwen3_moe": Family("qwen3_moe", "qwen3moe", "bpe", config={
        "num_experts": EXPERTS, "num_experts_per_tok": 2, "norm_topk_prob": True,
        "moe_intermediate_size": EXPERT_WIDTH}),          # not 768: the header must give it
    # Gemma 3 4B+: five sliding layers then a global one, whose rope alone is scaled
    "gemma3": Family("gemma3_text", "gemma3", "gemma-spm", layers=6, config={
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "tie_word_embeddings": True,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    # Phi-3-mini: fused qkv and gate/up, a SentencePiece vocabulary, a sliding window
    "phi3": Family("phi3", "phi3", "spm", config={"sliding_window": 8}, special=PHI_SPECIAL),
    # Phi-4-mini: 3/4 of each head rotated, LongRoPE
    "phi4-mini": Family("phi3", "phi3", "bpe", config={
        "max_position_embeddings": 256, "original_max_position_embeddings": 64,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                            "short_factor": SHORT, "long_factor": LONG,
                            "original_max_position_embeddings": 64}}, special=PHI_SPECIAL),
}


# ------------------------------------------------------------------ vocabularies

@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos: int
    eos: int
    encode: object                 # text -> ids, the source tokenizer's
    space_prefix: bool = False     # SentencePiece's add_dummy_prefix


def with_special(vocab: Vocab, special: tuple[str, ...]) -> Vocab:
    """The vocabulary with control tokens added at its end, as llama.cpp's converter lists
    a tokenizer's special added tokens."""
    n = len(special)
    return replace(vocab, tokens=vocab.tokens + list(special), types=vocab.types + [CONTROL] * n,
                   scores=None if vocab.scores is None else vocab.scores + [0.0] * n)


@pytest.fixture(scope="module")
def vocabs(tiny_tokenizer) -> dict[str, Vocab]:
    """conftest's byte-level BPE, and SentencePiece BPEs (byte fallback, no normalization)
    trained on the same text, Llama's (a space prefixed) and Gemma's (none); each as
    llama.cpp's converter lists it."""
    import json

    import sentencepiece
    from pydoc_data.topics import topics

    bpe = json.loads(tiny_tokenizer.backend_tokenizer.to_str())
    by_id = {i: t for t, i in tiny_tokenizer.get_vocab().items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["model"]["merges"]]
    bos = tiny_tokenizer.bos_token_id
    out = {"bpe": Vocab(tokens, [CONTROL if i == bos else NORMAL for i in range(len(tokens))], None,
                        merges, bos, tiny_tokenizer.eos_token_id,
                        lambda text: tiny_tokenizer.encode(text, add_special_tokens=False))}
    lines = [line for key in sorted(topics) for line in topics[key].splitlines() if line.strip()]
    for kind, prefix in (("spm", True), ("gemma-spm", False)):
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=prefix, minloglevel=2)
        sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
        ids = range(sp.get_piece_size())
        kinds = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                 else BYTE if sp.is_byte(i) else NORMAL for i in ids]
        out[kind] = Vocab([sp.id_to_piece(i) for i in ids], kinds, [sp.get_score(i) for i in ids], None,
                          sp.bos_id(), sp.eos_id(), sp.encode, prefix)
    return out


# ------------------------------------------------------------------ writing a GGUF

def hf_config(family: Family, vocab: int):
    config = tiny_config(family.model_type, layers=family.layers, hidden=HIDDEN, vocab=vocab)
    for key, value in family.config.items():
        setattr(config, key, value)
    return config


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order for its llama architecture (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model: torch.nn.Module, family: Family, arch) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's GGUF names (gguf-py's map), changed as
    llama.cpp's converter changes them: llama's Q/K rows reordered, Gemma's norms stored
    plus one, tied heads left out; fused experts as gate, up and down [experts, out, in]."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):
            gate, up = np.split(data, 2, axis=1)
            block = names.get_name(name.replace("gate_up_proj", "down_proj")).removesuffix("down_exps")
            out[block + "gate_exps.weight"], out[block + "up_exps.weight"] = gate, up
            continue
        if name.endswith("experts.down_proj"):
            out[names.get_name(name) + ".weight"] = data
            continue
        if family.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            data = _permute(data, heads)
        if family.arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        out[target] = data
    return out


def _rope_tensors(config) -> dict[str, np.ndarray]:
    """What llama.cpp's converter adds for rope scaling: Llama 3's per-frequency factors
    (computed here by transformers' own rope functions), LongRoPE's two factor lists."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = config.rope_parameters
    if rope.get("rope_type") == "llama3":
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        dim = _head_dim(config)
        plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)
        return {"rope_freqs.weight": (plain / scaled).numpy()}
    if rope.get("rope_type") == "longrope":
        return {"rope_factors_long.weight": np.array(rope["long_factor"], np.float32),
                "rope_factors_short.weight": np.array(rope["short_factor"], np.float32)}
    return {}


def _metadata(writer, family: Family, config, vocab: Vocab) -> None:
    import math

    import gguf

    rope = config.rope_parameters
    head_dim = _head_dim(config)
    writer.add_name(family.name or f"tiny-random-{family.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if family.arch == "gemma3":                     # Gemma3Model.set_gguf_parameters
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_sliding_window(config.sliding_window)
        if rope["full_attention"]["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["full_attention"]["factor"])
        return
    writer.add_rope_freq_base(rope["rope_theta"])
    if family.arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if family.arch == "phi3":     # Phi3MiniModel: a window of 0 for none, the original context always
        original = rope.get("original_max_position_embeddings", config.original_max_position_embeddings)
        writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_sliding_window(config.sliding_window or 0)
        writer.add_rope_scaling_orig_ctx_len(original)
        if rope.get("rope_type") == "longrope":
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    if family.arch == "qwen3moe":
        writer.add_expert_count(EXPERTS)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(EXPERT_WIDTH)


def _tokenizer_metadata(writer, vocab: Vocab) -> None:
    if vocab.merges is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")           # conftest's BPE splits with GPT-2's regex
        writer.add_token_merges(vocab.merges)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(vocab.scores)
        writer.add_unk_token_id(vocab.types.index(UNKNOWN))
        writer.add_add_space_prefix(vocab.space_prefix)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)


def write_gguf(path: Path, family_name: str, vocab: Vocab, seed: int = 0,
               **changes) -> tuple[Path, torch.nn.Module]:
    """(the .gguf, the Hugging Face model written into it), as llama.cpp's converter writes it."""
    import gguf

    family = FAMILIES[family_name]
    vocab = with_special(vocab, family.special)
    config = hf_config(family, len(vocab.tokens))
    for key, value in changes.items():
        setattr(config, key, value)
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[family.arch]
    writer = gguf.GGUFWriter(str(path), family.arch)
    _metadata(writer, family, model.config, vocab)
    _tokenizer_metadata(writer, vocab)
    for name, data in {**_tensors(model, family, arch), **_rope_tensors(model.config)}.items():
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def header_only(path: Path, arch: str, vocab: int = 0, **keys) -> Path:
    """A GGUF with a header and no tensors at all: whatever is decided from it was decided
    before any weight was read."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    for key, value in {"context_length": 4096, "embedding_length": HIDDEN, "block_count": LAYERS,
                       "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
                       "attention.key_length": 16, "attention.value_length": 16,
                       "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e4, **keys}.items():
        add = writer.add_float32 if isinstance(value, float) else writer.add_uint32
        add(f"{arch}.{key}", value)
    if vocab:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"<t{i}>" for i in range(vocab)])
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([NORMAL] * vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------ loaded as written

@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_gguf_of_the_family_loads_to_the_same_model_and_runs(name, vocabs, tmp_path):
    family = FAMILIES[name]
    vocab = vocabs[family.vocab]
    path, written = write_gguf(tmp_path / f"{name}.gguf", name, vocab)
    loaded = load_model(str(path), torch.device("cpu"), torch.float32)
    assert len(loaded.layers) == family.layers
    if family.model_type == "qwen3_moe":       # its experts split like a checkpoint's
        assert sum(".experts." in n for n in loaded.linear_names[0]) == EXPERTS * 3
    # the header's rope scaling, partial rotary, window and attention scale, as written
    # (LongRoPE's attention factor too, which llama.cpp's header states and the config derives)
    for key in ("sliding_window", "query_pre_attn_scalar"):
        assert getattr(loaded.model.config, key, None) == getattr(written.config, key, None), key
    rope = loaded.model.config.rope_parameters
    assert rope.items() >= written.config.rope_parameters.items()
    assert loaded.tokenizer.encode(TEXT, add_special_tokens=False) == vocab.encode(TEXT)
    tokens = torch.randint(0, len(vocab.tokens), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = written(tokens).logits, loaded.model(tokens).logits
    assert (got - want).abs().max().item() <= 1e-4
    config = RunConfig(model=str(path), samples=1, windows=2, window_tokens=32, device="cpu",
                       group_size=16, micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    assert RunDir.open(run.path).D().shape == (1, family.layers)


def test_without_the_header_values_transformers_skips_the_models_differ(vocabs, tmp_path):
    """What the header values read in are worth: transformers' own reading of these files
    gives other logits (Gemma 3's scaled global rope and attention scale, Phi-4-mini's
    partial LongRoPE, Llama 3's rope scaling: its lowest frequencies, so far along a text)."""
    for name in ("llama", "gemma3", "phi4-mini"):
        vocab = vocabs[FAMILIES[name].vocab]
        path, written = write_gguf(tmp_path / f"{name}.gguf", name, vocab, initializer_range=0.2)
        config = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
        config.pad_token_id = None           # Phi-3's default, 32000, is outside this vocabulary
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, config=config,
                                                     dtype=torch.float32)
        tokens = torch.randint(0, len(vocab.tokens), (1, 256), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert (plain(tokens).logits - written(tokens).logits).abs().max().item() > 1e-3, name


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_impq_tuis_own_conversion_loads_back_to_the_checkpoint(rope, tiny_tokenizer, tmp_path):
    """A checkpoint converted by core.export.gguf_convert (the gguf export's converter:
    Llama 3's scaling as a rope_freqs tensor, YaRN as header keys) reads back as the
    checkpoint it came from: its rope parameters and its logits far along a text."""
    from core.export.gguf_convert import convert
    from core.models import from_config

    family = "llama" if rope["rope_type"] == "llama3" else "qwen2"
    config = tiny_config(family, layers=2, vocab=len(tiny_tokenizer))
    config.rope_parameters, config.initializer_range = rope, 0.2
    written = from_config(config, torch.device("cpu"), torch.float32, seed=3).model
    written.save_pretrained(tmp_path / family)
    tiny_tokenizer.save_pretrained(tmp_path / family)
    path = convert(tmp_path / family, tmp_path / f"{family}.gguf")
    loaded = load_model(str(path), torch.device("cpu"), torch.float32)
    assert loaded.model.config.rope_parameters == written.config.rope_parameters
    tokens = torch.randint(0, len(tiny_tokenizer), (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(tokens).logits - written(tokens).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("factor, head_dim", [(8.0, 128), (32.0, 128), (32.0, 64)])
def test_llama3_rope_scaling_is_read_back_from_real_models_factors(factor, head_dim):
    """Llama 3.1/3.3 (factor 8) and 3.2 (factor 32, head_dim 128 and 64): the parameters
    recovered from the float32 per-frequency factors llama.cpp stores are the config's."""
    from transformers import LlamaConfig

    from core.models import _llama3_rope

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_parameters=rope)
    tensors = _rope_tensors(config)
    assert _llama3_rope(tensors["rope_freqs.weight"].astype(np.float64), 500000.0, head_dim) == {
        k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}


def test_the_header_is_read_as_transformers_reads_it(vocabs, tmp_path):
    """core.models reads the header with transformers' fast reader and its tables; the
    config is the one transformers' own (slow) GGUF reading gives, before the llama.cpp
    values it leaves at its defaults are read in; the tokenizer is AutoTokenizer's."""
    from core.models import _gguf_tokenizer, _transformers_gguf_config, gguf_header

    for name in ("llama", "mistral", "gemma3", "qwen3_moe", "phi3"):
        path, _ = write_gguf(tmp_path / f"{name}.gguf", name, vocabs[FAMILIES[name].vocab])
        metadata, tensors = gguf_header(path)
        config = _transformers_gguf_config(path, metadata, tensors)
        theirs = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
        assert {**config.to_dict(), "_name_or_path": ""} == {**theirs.to_dict(), "_name_or_path": ""}, name
        ours = _gguf_tokenizer(path, config)
        theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert type(ours) is type(theirs), name
        assert ours(TEXT).input_ids == theirs(TEXT).input_ids, name


# ------------------------------------------------------------------ decided from the header

def test_a_gemma3_gguf_is_accepted_from_its_header_alone(tmp_path, monkeypatch):
    """The bug report: a Gemma 3 GGUF refused as 'gemma3_text' after 74 s of loading. A
    header with Gemma 3's 262,144-entry vocabulary and no tensors at all: its structure
    and the backend's rules are decided from it, without gguf-py's reader (which parses
    every vocabulary entry: 13 s for this one)."""
    import gguf

    from core.backends import get_backend
    from core.engine import check_before_loading

    path = header_only(tmp_path / "gemma-3.gguf", "gemma3", vocab=262144,
                       **{"attention.sliding_window": 512})

    def not_now(*args, **kwargs):
        raise AssertionError("gguf-py's reader parsed the whole header")

    monkeypatch.setattr(gguf, "GGUFReader", not_now)
    meta = structure_of(str(path))
    assert type(meta).__name__ == "Gemma3ForCausalLM" and meta.config.vocab_size == 262144
    assert meta.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    check_before_loading(RunConfig(model=str(path), group_size=32), get_backend("quanto", 32))
    with pytest.raises(UserError, match="does not divide"):
        check_before_loading(RunConfig(model=str(path), group_size=48), get_backend("quanto", 48))


@pytest.mark.parametrize("arch, words", [
    ("olmo2", "'olmo2', which transformers .* cannot load from GGUF"),
    ("granite", "'granite', which transformers .* cannot load from GGUF"),
    ("mamba2", "'mamba2', which transformers .* cannot load from GGUF"),
])
def test_a_gguf_transformers_cannot_read_is_refused_from_its_header(arch, words, tmp_path):
    """OLMo 2 and Granite are loaded from their Hugging Face checkpoints only
    (tests/test_architectures.py): their GGUF files are refused, saying so, with no
    tensor in the file."""
    path = header_only(tmp_path / f"tiny-{arch}.gguf", arch)
    start = time.monotonic()
    with pytest.raises(UserError, match=words) as info:
        load_model(str(path), torch.device("cpu"))
    assert "Hugging Face checkpoint" in str(info.value)
    assert time.monotonic() - start < 10


def test_a_mixtral_gguf_is_refused_where_its_experts_would_be_dropped(tmp_path):
    """llama.cpp writes Mixtral as its llama architecture with experts, which transformers
    reads as a dense Llama (the experts' tensors ignored, the MLP left random)."""
    path = header_only(tmp_path / "mixtral.gguf", "llama", expert_count=8, expert_used_count=2)
    with pytest.raises(UserError, match="'llama' GGUF with 8 experts per layer.*experts would be dropped"):
        structure_of(str(path))


def test_a_gguf_missing_weights_is_refused_not_filled_with_random_values(tmp_path):
    """A header transformers reads and no tensors: transformers would make up every weight."""
    path = header_only(tmp_path / "empty-qwen3.gguf", "qwen3", vocab=64)
    with pytest.raises(UserError, match=r"has no tensor for \d+ weights of the Qwen3ForCausalLM"):
        load_model(str(path), torch.device("cpu"))



# ------------------------------------------------------------------ the gguf backend on them

@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python (the gguf extra) is not installed")
@pytest.mark.parametrize("name, linears", [("gemma3", 7), ("phi3", 4)])
def test_a_gguf_input_is_measured_and_exported_by_llama_cpp(name, linears, vocabs, tmp_path):
    """The gguf backend on GGUF files of families impq-tui does not convert from a
    checkpoint: SPQE simulates llama.cpp's types on the file's own linears (Phi-3's fused
    qkv and gate/up tensors), the export re-quantizes that file with llama.cpp's quantize
    (the simulated bytes, tensor for tensor), and llama.cpp runs it at the simulated
    perplexity."""
    import json

    from core.export import export_model
    from core.export.gguf import VERIFY_RTOL

    layers = FAMILIES[name].layers
    path, _ = write_gguf(tmp_path / f"{name}.gguf", name, vocabs[FAMILIES[name].vocab])
    config = RunConfig(model=str(path), backend="gguf", samples=1, windows=2, window_tokens=32,
                       device="cpu", micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    bits = [4] + [2] * (layers - 1)
    result = export_model(RunDir.open(run.path), bits, "gguf", str(tmp_path / "out"), verify=True,
                          eval_windows=2, eval_window_tokens=32)
    record = json.loads((tmp_path / "out" / "allocation.json").read_text())
    types = record["quantization"]["types_by_tensor"]
    per_layer = [{t for n, t in types.items()
                  if n.startswith(f"blk.{i}.") and not n.endswith("norm.weight")} for i in range(layers)]
    assert all(len(kinds) == 1 for kinds in per_layer)       # the layer's type (64-wide rows: its fallback)
    assert per_layer[0] != per_layer[1] == per_layer[-1]
    assert record["quantization"]["identical_tensors"] == linears * layers
    assert abs(result.ppl_reloaded - result.ppl) / result.ppl < VERIFY_RTOL
