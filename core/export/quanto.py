"""optimum-quanto's own serialization: model.safetensors (the frozen quantized state
dict) + quantization_map.json, reloaded by `requantize` onto a model built from config.json.

quanto's map records only each module's qtype; its loader re-derives the group size
from the layer's shape (128, else 96, 64 or 32 that divides the input features; a layer
of at most 128 inputs is quantized per output channel). A weight saved with any other
group size reloads as garbage, so this export quantizes with quanto's own
`quantize()`, which picks exactly those group sizes, and reports where they differ from
the run's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core.export.base import DTYPES, Exporter, Written, check_all_written, safetensors_bytes
from core.models import LoadedModel, load_model

WEIGHTS, QMAP = "model.safetensors", "quantization_map.json"


class QuantoExporter(Exporter):
    name = "quanto"
    distribution = "optimum-quanto"

    def load(self, config, device, bits_per_layer) -> LoadedModel:
        return load_model(config.model, device, DTYPES[config.dtype])

    def write(self, loaded, module_bits, folder: Path, config, checkpoint) -> Written:
        from optimum.quanto import freeze, qint2, qint4, quantization_map, quantize
        from safetensors.torch import save_file

        model = loaded.model
        qtypes = {2: qint2, 4: qint4}
        with torch.no_grad():
            for bits in sorted(set(module_bits.values())):
                # include= names are fnmatch patterns; module names hold no wildcard characters.
                quantize(model, weights=qtypes[bits],
                         include=[n for n, b in module_bits.items() if b == bits])
            freeze(model)
        model.requires_grad_(False)
        qmap = quantization_map(model)
        if set(qmap) != set(module_bits):
            raise RuntimeError(f"quanto quantized {len(qmap)} modules, {len(module_bits)} were asked for")
        checkpoint(f"writing {WEIGHTS} and {QMAP}")
        state = _untied(model.state_dict(), model.config)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS),
                  metadata={"format": "pt"})
        (folder / QMAP).write_text(json.dumps(qmap, indent=1) + "\n")
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)

        module_bytes = safetensors_bytes([folder / WEIGHTS], {n: f"{n}.weight." for n in module_bits})
        check_all_written(module_bits, module_bytes, "quanto")
        group_sizes = {n: _group_size(model.get_submodule(n)) for n in module_bits}
        notes = []
        differing = sorted({g for g in group_sizes.values() if g != config.group_size})
        if differing:
            notes.append(
                f"group size: quanto's serialization does not record it and its loader derives "
                f"it from each layer's shape, so this export uses quanto's own choice "
                f"({', '.join(map(str, differing))} inputs per group for some layers) where the "
                f"run estimated with {config.group_size}; the budget check counts the stored bytes.")
        return Written(module_bytes=module_bytes, weight_files=[WEIGHTS],
                       library=self.library_version(), dtype=config.dtype,
                       details={"group_size_by_module": group_sizes,
                                "qtype_by_module": {n: v["weights"] for n, v in qmap.items()},
                                "tied_word_embeddings": _tied(model.config)},
                       notes=notes)

    def snippet(self, folder_name: str, dtype: str) -> str:
        return _SNIPPET.format(path=folder_name, dtype=dtype)


def _group_size(module) -> int:
    """Inputs per quantization group; per output channel means all of them."""
    return module.weight_group_size or module.in_features


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _untied(state: dict, config) -> dict:
    """safetensors refuses tensors that share memory: keep the first name of each shared
    tensor (the input embedding); the loader ties the LM head back with tie_weights()."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, value in state.items():
        if type(value) is torch.Tensor and value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            if ident in seen:
                if not _tied(config):
                    raise RuntimeError(f"{key} shares memory with {seen[ident]} in a model whose "
                                       "config does not tie its word embeddings")
                continue
            seen[ident] = key
        out[key] = value
    return out


_SNIPPET = '''\
import json

import torch
from accelerate import init_empty_weights
from optimum.quanto import requantize
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

path = "{path}"   # this folder
device = "cuda" if torch.cuda.is_available() else "cpu"
config = AutoConfig.from_pretrained(path)
# init_empty_weights, not torch.device("meta"): under "meta" the rotary-embedding
# buffers, which the state dict does not hold, would stay uninitialized.
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=torch.{dtype})
with open(f"{{path}}/quantization_map.json") as f:
    quantization_map = json.load(f)
requantize(model, load_file(f"{{path}}/model.safetensors"), quantization_map, device=torch.device(device))
model.tie_weights()   # a model that shares its input embedding with the LM head gets it back
model.eval()
tokenizer = AutoTokenizer.from_pretrained(path)
'''
