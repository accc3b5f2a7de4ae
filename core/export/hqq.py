"""HQQ's own save format: qmodel.pt (every module's state dict; each HQQLinear carries
its own nbits, group size, scale and zero) + config.json, reloaded with
AutoHQQHFModel.from_quantized. The modules are the ones core.switching.LayerSwitch
built from core.backends.hqq: the model eval measures and SPQE simulated."""
from __future__ import annotations

from pathlib import Path

import torch

from core import experts
from core.export.base import Exporter, Written, check_all_written, tensor_bytes
from core.settings import dtype_name

WEIGHTS = "qmodel.pt"


class HqqExporter(Exporter):
    name = "hqq"
    distribution = "hqq"
    split_experts = False    # set by write(): the loader splits MoE experts as they were quantized

    def write(self, loaded, module_bits, folder: Path, config, checkpoint, progress) -> Written:
        from hqq.models.hf.base import AutoHQQHFModel

        self.split_experts = experts.split(loaded.model)
        checkpoint(f"writing {WEIGHTS} and config.json")
        AutoHQQHFModel.save_quantized(loaded.model, str(folder))
        if getattr(loaded.model, "generation_config", None) is not None:
            loaded.model.generation_config.save_pretrained(folder)

        names = list(module_bits)
        stored = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        module_bytes = {n: _stored_bytes(stored[n]) for n in names if n in stored and "W_q" in stored[n]}
        check_all_written(module_bits, module_bytes, "HQQ")
        return Written(module_bytes=module_bytes, weight_files=[WEIGHTS],
                       library=self.library_version(),
                       dtype=dtype_name(loaded.model.dtype),
                       details={"group_size": config.group_size,
                                "nbits_by_module": {n: int(stored[n]["nbits"]) for n in names},
                                "forward": "HQQBackend.PYTORCH"})

    def snippet(self, path: str, dtype: str) -> str:
        return (_SNIPPET_EXPERTS if self.split_experts else _SNIPPET).format(path=repr(path), dtype=dtype)


def _stored_bytes(state: dict) -> int:
    """W_q plus every tensor of metadata (scale, zero), as core.backends.hqq counts them."""
    return sum(tensor_bytes(v) for k, v in state.items() if isinstance(v, torch.Tensor) and k != "bias")


_SNIPPET = '''\
import torch
from hqq.core.quantize import HQQBackend, HQQLinear
from hqq.models.hf.base import AutoHQQHFModel
from transformers import AutoTokenizer

path = {path}   # this folder (change it if you move the folder)
device = "cuda" if torch.cuda.is_available() else "cpu"
HQQLinear.set_backend(HQQBackend.PYTORCH)   # the plain-PyTorch forward: runs on CPU and GPU
model = AutoHQQHFModel.from_quantized(path, compute_dtype=torch.{dtype}, device=device)
model.eval()
tokenizer = AutoTokenizer.from_pretrained(path)
'''


# Mixture of experts: hqq builds the model from config.json, with fused experts; the
# subclass splits them (defuser, as impq-tui did) before the quantized modules go in.
_SNIPPET_EXPERTS = '''\
import torch
from defuser import convert_model
from hqq.core.quantize import HQQBackend, HQQLinear
from hqq.models.hf.base import AutoHQQHFModel
from transformers import AutoTokenizer


class AutoHQQSplitExperts(AutoHQQHFModel):
    # The experts were quantized one nn.Linear per expert and projection; defuser (the
    # library GPTQModel uses for MoE models) splits the fused experts the same way.
    @classmethod
    def create_model(cls, save_dir, kwargs):
        model = super().create_model(save_dir, kwargs)
        convert_model(model)
        return model


path = {path}   # this folder (change it if you move the folder)
device = "cuda" if torch.cuda.is_available() else "cpu"
HQQLinear.set_backend(HQQBackend.PYTORCH)   # the plain-PyTorch forward: runs on CPU and GPU
model = AutoHQQSplitExperts.from_quantized(path, compute_dtype=torch.{dtype}, device=device)
model.eval()
tokenizer = AutoTokenizer.from_pretrained(path)
'''
