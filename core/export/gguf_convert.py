"""A Hugging Face checkpoint as an unquantized GGUF, with gguf-py: what the gguf export
re-quantizes when a run was made on a checkpoint rather than a .gguf.

    converted(config)        the run's checkpoint as GGUF, converted once into the user cache
    check_convertible(path)  the refusals, without writing anything (seconds)
    convert(path, target)    the conversion itself

What llama.cpp's convert_hf_to_gguf.py does for these families, with gguf-py's name maps
(tensor names, and which tensors each llama.cpp architecture has), metadata keys,
special-token reader (SpecialVocab) and writer; the tokenizer is core.export.gguf_vocab's.

- Families (FAMILIES: model_type -> llama.cpp architecture): Llama, Mistral and Mixtral
  ("llama"), Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (gemma3_text), Phi-3 (and
  Phi-4-mini), OLMo 2, Granite, StableLM, StarCoder2, GPT-NeoX. Each is checked by
  llama.cpp itself: the converted tiny checkpoint runs at the next-token losses
  transformers computes.
- Experts (Qwen3-MoE, Mixtral) are stacked per layer into llama.cpp's [experts, out, in]
  tensors (ffn_gate_exps, ffn_up_exps, ffn_down_exps), from per-expert tensors as
  transformers saves them (Mixtral's hub layout: block_sparse_moe.experts.E.w1, w2, w3 are
  gate, down and up, as llama.cpp's converter stacks them) or from fused ones.
- Q and K: llama.cpp's "llama" and "granite" architectures rotate interleaved pairs where
  Hugging Face rotates halves, so q_proj and k_proj rows (and biases) are reordered per
  head: the inverse of transformers' GGUF loader (`LlamaTensorProcessor`, which undoes it
  on load). The others keep Hugging Face's order (llama.cpp's NEOX rope), as there.
- What a family needs beyond that: Gemma's RMSNorm weights are applied as 1 + w, so they
  are stored plus one (F32); Gemma 2's soft caps and window, Gemma 3's window, final cap
  and sliding layers' rope base, Gemma's layer types where they are not llama.cpp's
  default pattern (Gemma 2 every other layer sliding, Gemma 3 five in six), Phi-3's
  window (llama.cpp's phi3 reads it and does not apply it yet; like Mistral's, Mixtral's
  and StarCoder2's window, which are not written, it matters only past the window),
  Granite's four multipliers (attention scale, embedding, residual and logit scales),
  GPT-NeoX's and StableLM's parallel residual, the rotated part of each head (Phi-4-mini,
  StableLM, GPT-NeoX rotate a part) as header values. Fused linears stay fused, as
  llama.cpp's tensors are: Phi-3's qkv_proj and gate_up_proj (attn_qkv, ffn_up),
  GPT-NeoX's query_key_value (attn_qkv, its rows reordered from per-head q, k, v to all
  q, then k, then v). Gemma's embedding scale, GELU and SWA pattern are llama.cpp's own.
- Refused, with llama.cpp's converter as the way to go, where llama.cpp's architecture
  would compute something else: other families; an activation it does not compute (it
  computes GELU as the tanh form, which Pythia's exact GELU is taken for, as llama.cpp's
  converter does); Gemma's query_pre_attn_scalar other than llama.cpp's attention scale
  (head_dim, hidden/heads at 27B's layer count), a Gemma 2 head of its own or without
  soft caps or window, Gemma 3 attention soft caps or a scaled rope on its sliding
  layers; StableLM's per-head q/k norms; Qwen2's sliding window, Qwen3-MoE with dense
  layers or unnormalized routing; rope scalings other than linear, yarn, Llama's llama3
  and Phi-3's longrope; `.bin`-only checkpoints; tensors without a name in the llama.cpp
  architecture.
- Metadata from the config: context length, embedding and feed-forward lengths, heads,
  KV heads, key/value length, rotated dimensions, rope base, norm epsilon (RMS or
  LayerNorm), vocabulary size, experts; rope scaling "linear", "yarn", Llama 3's "llama3"
  (a rope_freqs tensor of per-frequency factors, computed by transformers' own rope
  functions) and Phi-3's "longrope" (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini: its long
  and short factors, one per rotated pair, as rope_factors_long and rope_factors_short
  tensors, and the attention factor transformers' rope function computes). transformers
  takes the long factors for a sequence longer than original_max_position_embeddings,
  llama.cpp for a context longer than that (its context is padded to 256): the same
  losses where both are longer, or both not.
- Values: 2-D tensors keep the values the run quantized: in the run's dtype when it is
  16-bit, else in the checkpoint's own (BF16 stays BF16, F32 stays F32); 1-D tensors
  (norms, biases), the router and the rope factors in F32, as llama.cpp's converter stores them.
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
from core.export import gguf_vocab

# Bump when the conversion writes anything differently: the cached files get a new key.
FORMAT = 2
CACHE_SUBDIR = ("gguf", "converted")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")


@dataclass(frozen=True)
class Family:
    """What llama.cpp's architecture for a model_type needs written differently."""
    arch: str                               # gguf-py's MODEL_ARCH name
    rope_order: bool = False                # q/k rows reordered: llama.cpp rotates interleaved pairs
    norm: str = "rms"                       # "rms" or "layer" (LayerNorm), for the epsilon's key
    activations: tuple[str, ...] = ("silu",)    # the hidden_act llama.cpp's graph computes
    plus_one: bool = False                  # RMSNorm weights applied as 1 + w (Gemma): stored so
    experts: str | None = None              # the config key of the expert count (MoE families)


FAMILIES = {
    "llama": Family("LLAMA", rope_order=True), "mistral": Family("LLAMA", rope_order=True),
    "mixtral": Family("LLAMA", rope_order=True, experts="num_local_experts"),
    "qwen2": Family("QWEN2"), "qwen3": Family("QWEN3"),
    "qwen3_moe": Family("QWEN3MOE", experts="num_experts"),
    "gemma2": Family("GEMMA2", activations=_GELU_TANH, plus_one=True),
    "gemma3_text": Family("GEMMA3", activations=_GELU_TANH, plus_one=True),
    "phi3": Family("PHI3"),
    "olmo2": Family("OLMO2"),
    "granite": Family("GRANITE", rope_order=True),
    "stablelm": Family("STABLELM", norm="layer"),
    "starcoder2": Family("STARCODER2", norm="layer", activations=_GELU_TANH),
    # Pythia's exact (erf) GELU: llama.cpp computes its tanh form, as for every GPT-NeoX
    "gpt_neox": Family("GPTNEOX", norm="layer", activations=("gelu",) + _GELU_TANH),
}
NAMES = ("Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3, OLMo 2, "
         "Granite, StableLM, StarCoder2 and GPT-NeoX")
_GEMMA = ("GEMMA2", "GEMMA3")
# llama.cpp's Gemma attention scale: 1/sqrt(head_dim), 1/sqrt(hidden/heads) at the layer
# count of the 27B model (query_pre_attn_scalar is not read)
_GEMMA_27B_LAYERS = {"GEMMA2": 46, "GEMMA3": 62}

# one expert's projection (layer, expert, projection): mlp.experts.E.gate_proj, or in
# Mixtral's hub layout block_sparse_moe.experts.E.w1 (_MIXTRAL_PROJECTIONS)
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp\.experts\.(\d+)\.(gate|up|down)_proj"
                     r"|block_sparse_moe\.experts\.(\d+)\.(w[123]))\.weight$")
_MIXTRAL_PROJECTIONS = {"w1": "gate", "w2": "down", "w3": "up"}
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(gate_up_proj|down_proj)(\.weight)?$")
# buffers some checkpoints carry (GPT-NeoX's causal mask), not weights
_SKIPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.attention\.(masked_)?bias$")
_NEOX_QKV = re.compile(r"\.attention\.query_key_value\.(weight|bias)$")


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


def _family(config, folder: Path) -> Family:
    """The checkpoint's family, or why llama.cpp's architecture for it would compute
    something else than transformers does."""
    model_type = getattr(config, "model_type", "")
    if model_type not in FAMILIES:
        raise UserError(f"impq-tui converts {NAMES} checkpoints to GGUF, and {folder} is a "
                        f"{model_type or 'model of unknown type'}. {_hint(folder)}")
    family = FAMILIES[model_type]

    def refuse(why: str):
        raise UserError(f"{folder} {why} {_hint(folder)}")

    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act not in family.activations:
        refuse(f"uses the activation {act!r}, and llama.cpp's {family.arch.lower()} computes "
               f"{family.activations[-1]!r}.")
    if model_type == "qwen3_moe":
        sparse_step = getattr(config, "decoder_sparse_step", 1)
        if getattr(config, "mlp_only_layers", None) or sparse_step != 1:
            refuse("mixes dense and expert layers (`mlp_only_layers`, `decoder_sparse_step`), "
                   "which llama.cpp's qwen3moe does not.")
        if not getattr(config, "norm_topk_prob", True):
            refuse("does not normalize its routing weights (norm_topk_prob false); llama.cpp's "
                   "qwen3moe always does.")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        refuse("uses sliding-window attention (use_sliding_window), which llama.cpp's qwen2 does not.")
    if family.arch in _GEMMA:
        _check_gemma(config, family, refuse)
    if model_type == "stablelm" and getattr(config, "qk_layernorm", False):
        refuse("normalizes queries and keys per head (qk_layernorm), which impq-tui does not "
               "convert.")
    return family


def _check_gemma(config, family: Family, refuse: Callable[[str], None]) -> None:
    """Gemma 2 and 3 as llama.cpp runs them: its attention scale, Gemma 2's tied head, soft
    caps and window, Gemma 3 without attention soft caps and with unscaled sliding layers."""
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    dim = config.hidden_size // heads if layers == _GEMMA_27B_LAYERS[family.arch] else _head_dim(config)
    if float(config.query_pre_attn_scalar) != float(dim):
        refuse(f"scales attention by query_pre_attn_scalar {config.query_pre_attn_scalar}, and "
               f"llama.cpp's {family.arch.lower()} by {dim} for this shape.")
    if family.arch == "GEMMA2":
        if not getattr(config, "tie_word_embeddings", True):
            refuse("has an output head of its own (tie_word_embeddings false); llama.cpp's gemma2 "
                   "uses the token embeddings.")
        if config.attn_logit_softcapping is None or config.final_logit_softcapping is None:
            refuse("has no attention or final logit soft-capping, which llama.cpp's gemma2 applies.")
        if not config.sliding_window:
            refuse("has no sliding window, which llama.cpp's gemma2 applies.")
        return
    if getattr(config, "attn_logit_softcapping", None) is not None:
        refuse("soft-caps attention logits, which llama.cpp's gemma3 does not.")
    if _local_rope(config).get("rope_type", "default") != "default":
        refuse(f"scales the rope of its sliding layers ({_local_rope(config)}), which llama.cpp's "
               "gemma3 does not.")


def _local_rope(config) -> dict:
    """Gemma 3's rope for its sliding layers."""
    return dict((getattr(config, "rope_parameters", None) or {}).get("sliding_attention") or {})


def _sliding_layers(config, family: Family) -> list[bool] | None:
    """Gemma's sliding layers where they are not llama.cpp's default pattern (Gemma 2 every
    other layer, Gemma 3 five in six), which llama.cpp then reads per layer."""
    period = 2 if family.arch == "GEMMA2" else 6
    layers = config.num_hidden_layers
    default = [(i + 1) % period != 0 for i in range(layers)]
    types = getattr(config, "layer_types", None)
    sliding = default if types is None else [t == "sliding_attention" for t in types]
    return None if sliding == default else sliding


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:      # transformers before 5: rope_theta and rope_scaling
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0),
                  **(getattr(config, "rope_scaling", None) or {})}
    return dict(params.get("full_attention", params))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_dims(config) -> int:
    """Dimensions of each head rotated (Phi-4-mini, StableLM, GPT-NeoX rotate a part)."""
    factor = _rope(config).get("partial_rotary_factor",
                               getattr(config, "partial_rotary_factor", getattr(config, "rotary_pct", 1.0)))
    return int(_head_dim(config) * float(factor))


def _kv_heads(config) -> int:
    if config.model_type == "gpt_neox":         # no grouped-query attention (its config may say)
        return config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _eps(config) -> float:
    for key in ("rms_norm_eps", "layer_norm_eps", "norm_epsilon", "layer_norm_epsilon"):
        if getattr(config, key, None) is not None:
            return float(getattr(config, key))
    raise UserError(f"the config of a {config.model_type} gives no norm epsilon.")


def check_convertible(folder: Path) -> None:
    """Everything that would refuse the conversion, read from the config and the tokenizer
    files (seconds; nothing written)."""
    _checked(folder)


def _checked(folder: Path):
    """(config, family, vocabulary), or the refusal."""
    config = _hf_config(folder)
    family = _family(config, folder)
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn", "llama3", "longrope") or (
            rope_type == "llama3" and family.arch != "LLAMA") or (
            rope_type == "longrope" and family.arch != "PHI3"):
        raise UserError(f"{folder} scales its rope by {rope_type!r}; impq-tui converts the "
                        f"scalings linear, yarn, llama3 (Llama) and longrope (Phi-3) only. {_hint(folder)}")
    vocab = gguf_vocab.read(folder, _hint)
    _weight_files(folder)
    return config, family, vocab


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


# ------------------------------------------------------------------ the tensors

def _to_ggml_rope_order(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj/k_proj (weight or bias) in llama.cpp's order: per head, the two
    halves Hugging Face rotates together become interleaved pairs. transformers'
    LlamaTensorProcessor._reverse_permute_weights undoes exactly this on load."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _to_ggml_qkv_order(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-NeoX's fused query_key_value rows (weight or bias) in llama.cpp's order: Hugging
    Face keeps each head's q, k, v together, llama.cpp all heads' q, then k, then v."""
    return w.reshape(n_head, 3, w.shape[0] // n_head // 3, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def _plan(folder: Path, config, family: Family, dtype: str | None) -> list[_Tensor]:
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

    arch = gguf.MODEL_ARCH[family.arch]
    layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, layers)
    heads, kv_heads = config.num_attention_heads, _kv_heads(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wide = {"bfloat16": "BF16", "float16": "F16"}.get(dtype or "")

    def kind(shape, source: str, target: str) -> str:
        if len(shape) < 2 or target.endswith("ffn_gate_inp.weight"):
            return "F32"
        return wide or {"BF16": "BF16", "F16": "F16"}.get(source, "F32")

    plan: list[_Tensor] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}     # (layer, projection): expert -> name
    for name in files:
        if _SKIPPED.search(name) or (tied and name == "lm_head.weight"):
            continue
        if m := _EXPERT.match(name):
            expert, which = (m[2], m[3]) if m[2] is not None else (m[4], _MIXTRAL_PROJECTIONS[m[5]])
            experts.setdefault((int(m[1]), which), {})[int(expert)] = name
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
        if found is None or found[0] not in gguf.MODEL_TENSORS[arch]:
            raise UserError(f"the tensor {name} of {folder} has no name in llama.cpp's "
                            f"{gguf.MODEL_ARCH_NAMES[arch]} architecture (gguf-py "
                            f"{_version('gguf')}). {_hint(folder)}")
        target = found[1]               # with the suffix it matched (.weight or .bias)
        make = loader(name)
        if family.rope_order and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            n = heads if ".q_proj." in name else kv_heads
            make = lambda make=make, n=n: _to_ggml_rope_order(make(), n)
        elif _NEOX_QKV.search(name):
            make = lambda make=make: _to_ggml_qkv_order(make(), heads)
        elif family.plus_one and name.endswith("norm.weight"):
            make = lambda make=make: make().float() + 1
        plan.append(_Tensor(target, shape, kind(shape, source, target), make))
    for (layer, which), by_expert in sorted(experts.items()):
        order = [by_expert[e] for e in sorted(by_expert)]
        count = getattr(config, family.experts) if family.experts else 0
        if sorted(by_expert) != list(range(count)):
            raise UserError(f"{folder} holds experts {sorted(by_expert)} of layer {layer}'s "
                            f"{which}_proj, not 0..{count - 1}.")
        shape, source = info(order[0])
        target = names.get_name(f"model.layers.{layer}.mlp.experts.{which}_proj")  # the stack's name
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
    elif rope.get("rope_type") == "longrope":
        # both sets: llama.cpp rotates with the long factors when its context per sequence is
        # longer than original_max_position_embeddings, as transformers for sequences that long
        for key, tensor in (("long_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                            ("short_factor", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            factors = torch.tensor(rope[key], dtype=torch.float32)
            plan.append(_Tensor(f"{gguf.TENSOR_NAMES[tensor]}.weight", tuple(factors.shape), "F32",
                                lambda f=factors: f))
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

def _metadata(writer, config, family: Family, folder: Path) -> None:
    import gguf

    head_dim = _head_dim(config)
    writer.add_name(folder.name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(_rope_dims(config))
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
    elif kind == "longrope":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        # transformers' scale of cos and sin (attention_factor, else from factor or the ratio of
        # the contexts), which llama.cpp multiplies its rotation by as well
        _, scale = ROPE_INIT_FUNCTIONS["longrope"](config, torch.device("cpu"))
        writer.add_rope_scaling_attn_factors(float(scale))
    if family.norm == "rms":
        writer.add_layer_norm_rms_eps(_eps(config))
    else:
        writer.add_layer_norm_eps(_eps(config))
    writer.add_vocab_size(config.vocab_size)
    _family_metadata(writer, config, family)


def _family_metadata(writer, config, family: Family) -> None:
    """What a family's llama.cpp architecture reads beyond the common keys."""
    arch = family.arch
    if family.experts:
        writer.add_expert_count(getattr(config, family.experts))
        writer.add_expert_used_count(config.num_experts_per_tok)
    if arch == "QWEN3MOE":      # Mixtral's experts are intermediate_size wide, as llama.cpp's llama reads
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    elif arch == "GEMMA2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
    elif arch == "GEMMA3":
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if config.sliding_window:
            writer.add_sliding_window(int(config.sliding_window))
        writer.add_rope_freq_base_swa(float(_local_rope(config).get("rope_theta", 10000.0)))
    elif arch == "PHI3":      # as llama.cpp's converter: a window of 0 for none
        writer.add_sliding_window(int(config.sliding_window or 0))
        writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                                 or config.max_position_embeddings))
    elif arch == "GRANITE":   # Granite's multipliers, which llama.cpp's granite reads
        writer.add_attention_scale(float(config.attention_multiplier))
        writer.add_embedding_scale(float(config.embedding_multiplier))
        writer.add_residual_scale(float(config.residual_multiplier))
        writer.add_logit_scale(float(config.logits_scaling))
    elif arch in ("GPTNEOX", "STABLELM"):
        writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    if arch in _GEMMA and (sliding := _sliding_layers(config, family)):
        writer.add_sliding_window_pattern(sliding)


def convert(folder: Path, target: Path, dtype: str | None = None,
            progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Write `folder`'s checkpoint to `target` as GGUF (`dtype`: the dtype the run held
    the weights in; None keeps the checkpoint's). Returns `target`. `progress(k, n, name)`
    after tensor k of n is written; what it raises (core.errors.Cancelled) stops the
    conversion between tensors, and the partial file goes."""
    import gguf

    folder = Path(folder)
    config, family, vocab = _checked(folder)
    plan = _plan(folder, config, family, dtype)
    kinds = [t.kind for t in plan if len(t.shape) >= 2]
    file_type = {"BF16": gguf.LlamaFileType.MOSTLY_BF16, "F16": gguf.LlamaFileType.MOSTLY_F16}.get(
        max(set(kinds), key=kinds.count), gguf.LlamaFileType.ALL_F32)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
        _metadata(writer, config, family, folder)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        gguf_vocab.write(writer, vocab, folder, config.vocab_size)
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
