"""A Hugging Face checkpoint as an unquantized GGUF, with gguf-py: what the gguf export
re-quantizes when a run was made on a checkpoint rather than a .gguf.

    converted(config)        the run's checkpoint as GGUF, converted once into the user cache
    check_convertible(path)  the refusals, without writing anything (seconds)
    convert(path, target)    the conversion itself

What llama.cpp's convert_hf_to_gguf.py does for these families, with gguf-py's name map,
metadata keys, special-token reader (SpecialVocab) and writer:

- Families: Llama and Mistral (llama.cpp's "llama" architecture), Qwen2, Qwen3, and
  Qwen3-MoE (experts stacked per layer into llama.cpp's [experts, out, in] tensors).
- Q and K: llama.cpp's "llama" architecture rotates interleaved pairs where Hugging
  Face's Llama rotates halves, so q_proj and k_proj rows (and biases) are reordered per
  head: the inverse of transformers' GGUF loader (`LlamaTensorProcessor`, which undoes
  it on load). Qwen2/3 keep Hugging Face's order (llama.cpp's NEOX rope), as there.
- Metadata from the config: context length, embedding and feed-forward lengths, heads,
  KV heads, key/value length, rope base, norm epsilon, vocabulary size, experts; rope
  scaling "linear", "yarn" and Llama 3's "llama3" (a rope_freqs tensor of per-frequency
  factors, computed by transformers' own rope functions). Other scalings are refused.
- Tokenizer: byte-level BPE (tokenizer.json) only, `tokenizer.ggml.model` "gpt2": tokens
  by id (added tokens: special ones control, others user-defined; ids the vocabulary
  leaves free [PAD<id>], unused), merges, special ids, add_bos/add_eos as the Hugging
  Face tokenizer actually adds them, chat template. `tokenizer.ggml.pre` is read from
  the tokenizer's pre-tokenizer: the regex it splits with is the one llama.cpp's pre type
  applies (llama-bpe, qwen2, tekken, smollm, gpt-2). SentencePiece tokenizers and
  pre-tokenizers llama.cpp has no type for are refused, with llama.cpp's converter as the
  way to go.
- Values: 2-D tensors keep the values the run quantized: in the run's dtype when it is
  16-bit, else in the checkpoint's own (BF16 stays BF16, F32 stays F32); 1-D tensors
  (norms, biases), the router and rope_freqs in F32, as llama.cpp's converter stores them.
  Tensors are read and written one at a time (safetensors, memory-mapped).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.errors import UserError

# Bump when the conversion writes anything differently: the cached files get a new key.
FORMAT = 1
CACHE_SUBDIR = ("gguf", "converted")

# model_type -> (gguf-py architecture name, Q/K reordered for llama.cpp's rope)
FAMILIES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False),
            "qwen3": ("QWEN3", False), "qwen3_moe": ("QWEN3MOE", False)}

# The pre-tokenizer regexes of the tokenizer.json files llama.cpp's pre types stand for
# (the regex each type applies is in llama.cpp's src/llama-vocab.cpp).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
           r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
           r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
           r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2", _TEKKEN: "tekken"}

_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(gate_up_proj|down_proj)(\.weight)?$")
_SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _hint(folder: Path) -> str:
    beside = folder.parent / f"{folder.name}.gguf"
    return (f"Convert it with llama.cpp's converter (from a llama.cpp checkout): `python "
            f"convert_hf_to_gguf.py {folder} --outtype f32 --outfile {beside}` (the export "
            "takes that file beside the folder), then export again.")


# ------------------------------------------------------------------ what is converted

@dataclass
class _Tensor:
    name: str                       # llama.cpp's name
    shape: tuple[int, ...]          # numpy order
    kind: str                       # "F32", "F16" or "BF16"
    make: Callable[[], torch.Tensor]

    def array(self) -> np.ndarray:
        t = self.make().contiguous()
        if self.kind == "BF16":
            return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return t.to(torch.float16 if self.kind == "F16" else torch.float32).numpy()


def _hf_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the config of {folder}: {exc}") from None


def _family(config, folder: Path) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", "")
    if model_type not in FAMILIES:
        raise UserError(
            f"impq-tui converts Llama, Mistral, Qwen2, Qwen3 and Qwen3-MoE checkpoints to GGUF, "
            f"and {folder} is a {model_type or 'model of unknown type'}. {_hint(folder)}")
    if model_type == "qwen3_moe":
        sparse_step = getattr(config, "decoder_sparse_step", 1)
        if getattr(config, "mlp_only_layers", None) or sparse_step != 1:
            raise UserError(f"{folder} mixes dense and expert layers (`mlp_only_layers`, "
                            f"`decoder_sparse_step`), which llama.cpp's qwen3moe does not. {_hint(folder)}")
        if not getattr(config, "norm_topk_prob", True):
            raise UserError(f"{folder} does not normalize its routing weights (norm_topk_prob "
                            "false); llama.cpp's qwen3moe always does. " + _hint(folder))
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UserError(f"{folder} uses sliding-window attention (use_sliding_window), which "
                        f"llama.cpp's qwen2 does not. {_hint(folder)}")
    arch, permute = FAMILIES[model_type]
    return arch, permute


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:      # transformers before 5: rope_theta and rope_scaling
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0),
                  **(getattr(config, "rope_scaling", None) or {})}
    return dict(params.get("full_attention", params))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_convertible(folder: Path) -> None:
    """Everything that would refuse the conversion, read from the config and the tokenizer
    files (seconds; nothing written)."""
    config = _hf_config(folder)
    arch, _ = _family(config, folder)
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn", "llama3") or (
            rope_type == "llama3" and arch != "LLAMA"):
        raise UserError(f"{folder} scales its rope by {rope_type!r}; impq-tui converts the "
                        f"scalings linear, yarn and llama3 only. {_hint(folder)}")
    _tokenizer(folder)
    _weight_files(folder)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Each tensor's safetensors file."""
    from core.files import read_text

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(read_text(index, "the checkpoint's index"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map).") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise UserError(f"{folder} holds no safetensors weights (model.safetensors or its index); "
                    f"impq-tui converts safetensors checkpoints only. {_hint(folder)}")


# ------------------------------------------------------------------ the tokenizer

def _tokenizer(folder: Path):
    """(the tokenizer transformers loads for the checkpoint, llama.cpp's pre-tokenizer type
    for it), or a refusal naming what the tokenizer is. The loaded tokenizer is what the
    run tokenized with: transformers rebuilds some families' (Qwen2's class splits with
    Qwen2's regex and NFC whatever tokenizer.json says), so that one is read, not the file."""
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        what = ("a SentencePiece model (tokenizer.model)" if (folder / "tokenizer.model").is_file()
                else "not given as a tokenizer.json")
        raise UserError(f"impq-tui converts byte-level BPE tokenizers (tokenizer.json) to GGUF, "
                        f"and the tokenizer of {folder} is {what}. {_hint(folder)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model, decoder = spec["model"], spec.get("decoder") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read the tokenizer of {folder} as a byte-level BPE tokenizer "
                        f"({type(exc).__name__}: {str(exc)[:200]}). {_hint(folder)}") from None
    what = f"the tokenizer transformers loads for {folder} ({type(tokenizer).__name__})"
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        kind = ("a BPE model with byte fallback (SentencePiece-style)" if model.get("byte_fallback")
                else f"a {model.get('type')} model with a {decoder.get('type')} decoder")
        raise UserError(f"impq-tui converts byte-level BPE tokenizers to GGUF, and {what} is "
                        f"{kind}. {_hint(folder)}")
    normalizer = (spec.get("normalizer") or {}).get("type")
    steps = _steps(spec.get("pre_tokenizer") or {})
    pre = None
    if normalizer in (None, "NFC"):
        if steps == [("ByteLevel", True, False)]:
            pre = "gpt-2"
        elif steps == [("Digits", True), ("ByteLevel", True, False)]:
            pre = "smollm"
        elif len(steps) == 2 and steps[0][0] == "Split" and steps[1] == ("ByteLevel", False, False):
            pre = SPLIT_PRE.get(steps[0][1]) if steps[0][2:] == ("Isolated", False) else None
    if pre is None:
        raise UserError(f"the pre-tokenizer of {what} "
                        f"({json.dumps(spec.get('pre_tokenizer'))[:200]}"
                        f"{f', normalizer {normalizer}' if normalizer else ''}) is not one impq-tui "
                        f"knows llama.cpp's type for. {_hint(folder)}")
    return tokenizer, pre


def _steps(pre: dict) -> list[tuple]:
    if pre.get("type") == "Sequence":
        return [s for p in pre.get("pretokenizers", []) for s in _steps(p)]
    if pre.get("type") == "ByteLevel":
        return [("ByteLevel", bool(pre.get("use_regex", True)), bool(pre.get("add_prefix_space")))]
    if pre.get("type") == "Digits":
        return [("Digits", bool(pre.get("individual_digits")))]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern") or {}
        return [("Split", pattern.get("Regex", pattern.get("String")), pre.get("behavior"),
                 bool(pre.get("invert")))]
    return [(pre.get("type"),)]


def _looks_special(text: str) -> bool:
    """Added tokens some tokenizers do not flag special although they are (<|im_start|>)."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _write_tokenizer(writer, folder: Path, n_vocab: int) -> None:
    import gguf

    tokenizer, pre = _tokenizer(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    # Added tokens past the model's embedding (transformers' Qwen2 class adds
    # <|endoftext|> to any vocabulary) can never reach the model: not in the file.
    beyond = sorted(i for i in by_id if i >= n_vocab)
    if any(i not in added for i in beyond):
        raise UserError(f"the tokenizer of {folder} has ids up to {beyond[-1]}, beyond the model's "
                        f"vocab_size {n_vocab}.")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            special = added[i].special or _looks_special(by_id[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    # Whether BOS/EOS are added: as the Hugging Face tokenizer does it, not as its files
    # would be parsed (llama.cpp's default for a pre type is otherwise taken).
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(bos is not None and ids and ids[0] == bos)
    special.add_special_token["eos"] = bool(eos is not None and ids and ids[-1] == eos and len(ids) > 1)
    if not special.chat_template and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


# ------------------------------------------------------------------ the tensors

def _to_ggml_rope_order(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj/k_proj (weight or bias) in llama.cpp's order: per head, the two
    halves Hugging Face rotates together become interleaved pairs. transformers'
    LlamaTensorProcessor._reverse_permute_weights undoes exactly this on load."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _plan(folder: Path, config, arch_name: str, permute: bool, dtype: str | None) -> list[_Tensor]:
    import gguf
    from safetensors import safe_open

    files = _weight_files(folder)
    handles: dict[Path, object] = {}

    def opened(path: Path):
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path]

    def loader(name: str) -> Callable[[], torch.Tensor]:
        return lambda: opened(files[name]).get_tensor(name)

    def info(name: str) -> tuple[tuple[int, ...], str]:
        piece = opened(files[name]).get_slice(name)
        return tuple(piece.get_shape()), piece.get_dtype()

    arch = gguf.MODEL_ARCH[arch_name]
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wide = {"bfloat16": "BF16", "float16": "F16"}.get(dtype or "")

    def kind(shape, source: str, target: str) -> str:
        if len(shape) < 2 or target.endswith("ffn_gate_inp.weight"):
            return "F32"
        return wide or {"BF16": "BF16", "F16": "F16"}.get(source, "F32")

    plan: list[_Tensor] = []
    experts: dict[tuple[str, int, str], dict[int, str]] = {}
    for name in files:
        if _SKIPPED.search(name) or (tied and name == "lm_head.weight"):
            continue
        if m := _EXPERT.match(name):
            experts.setdefault((m[1], int(m[2]), m[4]), {})[int(m[3])] = name
            continue
        shape, source = info(name)
        if m := _FUSED_EXPERTS.match(name):
            if m[3] == "down_proj":
                target = names.get_name(f"{m[1]}.down_proj")
                plan.append(_Tensor(f"{target}.weight", shape, kind(shape, source, target), loader(name)))
                continue
            half = shape[1] // 2
            for which, part in (("gate", 0), ("up", 1)):
                target = names.get_name(f"{m[1]}.{which}_proj")
                plan.append(_Tensor(f"{target}.weight", (shape[0], half, shape[2]),
                                    kind(shape, source, target),
                                    lambda n=name, p=part, h=half: loader(n)()[:, p * h:(p + 1) * h]))
            continue
        found = names.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise UserError(f"the tensor {name} of {folder} has no name in llama.cpp's "
                            f"{gguf.MODEL_ARCH_NAMES[arch]} architecture (gguf-py "
                            f"{_version('gguf')}). {_hint(folder)}")
        target = found[1]               # with the suffix it matched (.weight or .bias)
        make = loader(name)
        if permute and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            n = heads if ".q_proj." in name else kv_heads
            make = lambda make=make, n=n: _to_ggml_rope_order(make(), n)
        plan.append(_Tensor(target, shape, kind(shape, source, target), make))
    for (prefix, layer, which), by_expert in sorted(experts.items()):
        order = [by_expert[e] for e in sorted(by_expert)]
        if sorted(by_expert) != list(range(config.num_experts)):
            raise UserError(f"{folder} holds experts {sorted(by_expert)} of layer {layer}'s "
                            f"{which}_proj, not 0..{config.num_experts - 1}.")
        shape, source = info(order[0])
        target = names.get_name(f"{prefix}.{which}_proj")
        plan.append(_Tensor(f"{target}.weight", (len(order), *shape), kind((0, 0), source, target),
                            lambda order=order: torch.stack([loader(n)() for n in order])))
    rope = _rope(config)
    if rope.get("rope_type") == "llama3":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        dim = _head_dim(config)
        theta = float(rope.get("rope_theta", 10000.0))
        plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
        factors = plain / scaled.float()
        plan.append(_Tensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight",
                            tuple(factors.shape), "F32", lambda f=factors: f))
    got = {t.name for t in plan}
    for must in ("token_embd.weight", "output_norm.weight"):
        if must not in got:
            raise UserError(f"{folder} has no tensor for llama.cpp's {must}; it is not a whole "
                            "checkpoint.")
    return plan


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# ------------------------------------------------------------------ the file

def _metadata(writer, config, arch_name: str, folder: Path) -> None:
    import gguf

    head_dim = _head_dim(config)
    writer.add_name(folder.name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch_name == "LLAMA":
        writer.add_rope_dimension_count(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind, factor = rope.get("rope_type", "default"), rope.get("factor")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(factor))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                 or config.max_position_embeddings))
        if rope.get("attention_factor") is not None:
            writer.add_rope_scaling_yarn_attn_factor(float(rope["attention_factor"]))
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if arch_name == "QWEN3MOE":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def convert(folder: Path, target: Path, dtype: str | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write `folder`'s checkpoint to `target` as GGUF (`dtype`: the dtype the run held
    the weights in; None keeps the checkpoint's). Returns `target`. `progress(k, n, name)`
    after tensor k of n is written; what it raises (core.errors.Cancelled) stops the
    conversion between tensors, and the partial file goes."""
    import gguf

    folder = Path(folder)
    check_convertible(folder)
    config = _hf_config(folder)
    arch_name, permute = _family(config, folder)
    plan = _plan(folder, config, arch_name, permute, dtype)
    kinds = [t.kind for t in plan if len(t.shape) >= 2]
    file_type = {"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
        max(set(kinds), key=kinds.count), gguf.LlamaFileType.ALL_F32)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch_name]])
        _metadata(writer, config, arch_name, folder)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write_tokenizer(writer, folder, config.vocab_size)
        raw = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
               "BF16": gguf.GGMLQuantizationType.BF16}
        size = {"F32": 4, "F16": 2, "BF16": 2}
        for t in plan:
            np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t.kind]
            writer.add_tensor_info(t.name, t.shape, np.dtype(np_dtype),
                                   int(np.prod(t.shape)) * size[t.kind], raw_dtype=raw[t.kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for k, t in enumerate(plan, 1):    # one tensor in memory at a time
            data = t.array()
            if data.shape != t.shape:
                raise RuntimeError(f"{t.name}: {data.shape} read, {t.shape} announced")
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(k, len(plan), t.name)
        writer.close()
        os.replace(tmp, target)
    except BaseException:
        if writer is not None:
            writer.close()             # its open file (a no-op once closed)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


# ------------------------------------------------------------------ the cache

def cache_key(folder: Path, dtype: str | None) -> str:
    """What the conversion depends on: the checkpoint's files (the run fingerprint's
    digests), the dtype, gguf-py's version and this converter's format."""
    from core.fingerprint import model_part

    part = model_part(str(folder)) or {}
    record = {"format": FORMAT, "gguf": _version("gguf"), "dtype": dtype or "",
              **{k: part.get(k) for k in ("weights", "model_config", "tokenizer")}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cached_path(folder: Path, dtype: str | None) -> Path:
    from core.models import cache_dir

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name) or "model"
    return cache_dir().joinpath(*CACHE_SUBDIR) / f"{name}-{cache_key(folder, dtype)}.gguf"


def converted(folder: Path, dtype: str | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> Path:
    """The checkpoint converted to GGUF, from the user cache when it was converted
    before (the same files, dtype and converter); `progress` as for convert()."""
    path = cached_path(folder, dtype)
    if path.is_file():
        return path
    try:
        return convert(folder, path, dtype, progress)
    except OSError as exc:
        from core.files import why

        raise UserError(f"the GGUF conversion of {folder} could not be written to {path.parent}: "
                        f"{why(exc)}. Set IMPQ_TUI_CACHE (or XDG_CACHE_HOME) to a writable "
                        "folder.") from None
