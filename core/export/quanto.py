"""optimum-quanto's own serialization: model.safetensors (the frozen quantized state
dict) + quantization_map.json, reloaded with `requantize` onto a model built from
config.json.

quanto's map records only each module's qtype, and its loader derives the group size
from the layer's shape (128, else 96, 64 or 32 dividing the input features). A weight
saved with another group size reloads as garbage, and the run measured its own group
size: so the group size of every module goes into group_sizes.json beside the weights,
and the snippet sets it on each module before the weights are loaded. The modules
written are the ones core.switching.LayerSwitch built, the model eval measures.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from core import experts
from core.export.base import Exporter, Written, check_all_written, safetensors_bytes
from core.settings import dtype_name

WEIGHTS, QMAP, GROUPS = "model.safetensors", "quantization_map.json", "group_sizes.json"


class QuantoExporter(Exporter):
    name = "quanto"
    distribution = "optimum-quanto"
    split_experts = False    # set by write(): the loader splits MoE experts as they were quantized

    def write(self, loaded, module_bits, folder: Path, config, checkpoint, progress) -> Written:
        from optimum.quanto import quantization_map
        from safetensors.torch import save_file

        model = loaded.model
        self.split_experts = experts.split(model)
        qmap = quantization_map(model)
        if set(qmap) != set(module_bits):
            raise RuntimeError(f"quanto quantized {len(qmap)} modules, {len(module_bits)} were asked for")
        group_sizes = {n: model.get_submodule(n).weight_group_size for n in module_bits}
        checkpoint(f"writing {WEIGHTS}, {QMAP} and {GROUPS}")
        state = _untied(model.state_dict(), model.config)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS),
                  metadata={"format": "pt"})
        (folder / QMAP).write_text(json.dumps(qmap, indent=1) + "\n")
        (folder / GROUPS).write_text(json.dumps(group_sizes, indent=1) + "\n")
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)

        module_bytes = safetensors_bytes([folder / WEIGHTS], {n: f"{n}.weight." for n in module_bits})
        check_all_written(module_bits, module_bytes, "quanto")
        return Written(module_bytes=module_bytes, weight_files=[WEIGHTS],
                       library=self.library_version(), dtype=dtype_name(model.dtype),
                       details={"group_size": config.group_size,
                                "qtype_by_module": {n: v["weights"] for n, v in qmap.items()},
                                "tied_word_embeddings": _tied(model.config)})

    def snippet(self, path: str, dtype: str) -> str:
        return _SNIPPET.format(path=repr(path), dtype=dtype,
                               experts=experts.SNIPPET if self.split_experts else "")


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
from pathlib import Path

import torch
from accelerate import init_empty_weights
from optimum.quanto import requantize
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

path = Path({path})   # this folder (change it if you move the folder)
device = "cuda" if torch.cuda.is_available() else "cpu"
config = AutoConfig.from_pretrained(path)
# init_empty_weights, not torch.device("meta"): under "meta" the rotary-embedding
# buffers, which the state dict does not hold, would stay uninitialized.
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(config, dtype=torch.{dtype})
{experts}quantization_map = json.loads((path / "quantization_map.json").read_text())
requantize(model, {{}}, quantization_map, device=torch.device(device))   # quanto modules, no weights yet
# quanto's files do not record the group size, and its loader would guess another one
# from each layer's shape: set the one these weights were quantized with.
for name, group_size in json.loads((path / "group_sizes.json").read_text()).items():
    model.get_submodule(name).weight_group_size = group_size
model.load_state_dict(load_file(path / "model.safetensors", device=device), strict=False)
model.tie_weights()   # a model that shares its input embedding with the LM head gets it back
model.eval()
tokenizer = AutoTokenizer.from_pretrained(path)
'''
