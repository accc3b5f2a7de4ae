"""GGUF inputs of families other than Llama load as the embedded model does (core.models
_load_gguf, through transformers' GGUF reader): tiny random Hugging Face models written
as F32 GGUF files with gguf-py's writer (llama.cpp's tensor names and metadata keys,
the embedded SmolLM2's tokenizer), loaded back to the same logits, and run end to end.
A family transformers cannot read from GGUF is refused from the header, in seconds."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from core.engine import run_spqe
from core.errors import UserError
from core.models import _installed_embedded_gguf, load_model, tiny_config
from core.runs import RunConfig, RunDir

HIDDEN, LAYERS, EXPERTS, EXPERT_WIDTH = 64, 2, 4, 32

pytestmark = pytest.mark.skipif(_installed_embedded_gguf() is None,
                                reason="the embedded model's package (its tokenizer) is not installed")


def _config(model_type: str, vocab: int):
    config = tiny_config(model_type, layers=LAYERS, hidden=HIDDEN, vocab=vocab)
    if model_type == "qwen3_moe":
        config.num_experts, config.num_experts_per_tok = EXPERTS, 2
        config.moe_intermediate_size = EXPERT_WIDTH    # not 768: the header must give it
        config.norm_topk_prob = True   # as Qwen3-MoE's are, and as llama.cpp (and so transformers' GGUF reader) takes them
    return config


def _tensors(model: torch.nn.Module, arch) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's GGUF names (gguf-py's map); fused experts
    as llama.cpp stores them: gate, up and down, each [experts, out, in]."""
    import gguf

    names = gguf.get_tensor_name_map(arch, LAYERS)
    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name.endswith("experts.gate_up_proj"):
            gate, up = np.split(data, 2, axis=1)
            block = names.get_name(name.replace("gate_up_proj", "down_proj")).removesuffix("down_exps")
            out[block + "gate_exps.weight"], out[block + "up_exps.weight"] = gate, up
            continue
        if name.endswith("experts.down_proj"):
            out[names.get_name(name) + ".weight"] = data
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        out[target] = data
    return out


def write_gguf(path: Path, model_type: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """(the .gguf, the Hugging Face model written into it)."""
    import gguf

    reader = gguf.GGUFReader(str(_installed_embedded_gguf()))
    vocab = len(reader.get_field("tokenizer.ggml.tokens").contents())
    config = _config(model_type, vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    arch = {"qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}.get(model_type) or gguf.MODEL_ARCH[model_type.upper()]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(f"tiny-random-{model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or HIDDEN // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab)
    if model_type == "qwen3_moe":
        writer.add_expert_count(EXPERTS)
        writer.add_expert_used_count(2)
        writer.add_expert_feed_forward_length(EXPERT_WIDTH)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for name, data in _tensors(model, arch).items():
        writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen3_moe"])
def test_a_gguf_of_the_family_loads_to_the_same_model_and_runs(family, tmp_path):
    path, written = write_gguf(tmp_path / f"{family}.gguf", family)
    loaded = load_model(str(path), torch.device("cpu"), torch.float32)
    assert len(loaded.layers) == LAYERS
    if family == "qwen3_moe":       # its experts split like a checkpoint's
        assert sum(".experts." in n for n in loaded.linear_names[0]) == EXPERTS * 3
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = written(tokens).logits, loaded.model(tokens).logits
    assert (got - want).abs().max().item() <= 1e-4
    config = RunConfig(model=str(path), samples=1, windows=2, window_tokens=32, device="cpu",
                       group_size=32, micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    assert RunDir.open(run.path).D().shape == (1, LAYERS)


def test_a_gguf_transformers_cannot_read_is_refused_from_its_header(tmp_path):
    """An architecture outside transformers' GGUF reader, with no tensors at all in the
    file: a refusal in seconds that names what it reads."""
    import gguf

    path = tmp_path / "tiny-mamba2.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    start = time.monotonic()
    with pytest.raises(UserError, match="could not read the GGUF file"):
        load_model(str(path), torch.device("cpu"))
    assert time.monotonic() - start < 10
