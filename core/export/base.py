"""What every export backend provides: load the model, quantize and write it, measure
the written quantized weights, evaluate the in-memory result, and say how to load it."""
from __future__ import annotations

import importlib.metadata
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core.errors import UserError
from core.models import LoadedModel
from core.runs import RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Written:
    """What a backend wrote into the export folder."""
    module_bytes: dict[str, int]   # quantized module -> bytes of its stored weights, read from the files
    weight_files: list[str]        # files (relative to the folder) holding the weights
    library: str                   # "optimum-quanto 0.2.7"
    dtype: str                     # the dtype the model computes in
    details: dict = field(default_factory=dict)   # backend-specific: group sizes, kernels
    notes: list[str] = field(default_factory=list)


class Exporter(ABC):
    name: str
    distribution: str      # the PyPI package that loads this format
    extra_hint: str = ""   # how to install it when missing

    def check_available(self) -> None:
        """Raise a UserError when the library cannot be used here."""

    @abstractmethod
    def load(self, config: RunConfig, device: torch.device, bits_per_layer: list[int]) -> LoadedModel:
        """The run's model, unquantized, ready for write()."""

    def close(self) -> None:
        """Remove what load() left behind (temporary checkpoints)."""

    @abstractmethod
    def write(self, loaded: LoadedModel, module_bits: dict[str, int], folder: Path,
              config: RunConfig, checkpoint: Callable[[str], None]) -> Written:
        """Quantize loaded.model in place, each named linear at its bits, and save it in the
        library's own format into folder (config.json included)."""

    @abstractmethod
    def snippet(self, folder_name: str, dtype: str) -> str:
        """Python that loads the export with the library's public API into `model`, `tokenizer`."""

    def perplexity(self, loaded: LoadedModel, tokens: torch.Tensor, micro_batch: int) -> float:
        return forward_perplexity(loaded.model, tokens, micro_batch)

    def over_budget_hint(self, config: RunConfig) -> str:
        return ("Export with the run's own backend, or choose a lower --bits so that the "
                "allocation leaves room.")

    def library_version(self) -> str:
        try:
            return f"{self.distribution} {importlib.metadata.version(self.distribution)}"
        except importlib.metadata.PackageNotFoundError:
            return self.distribution


def forward_perplexity(model, tokens: torch.Tensor, micro_batch: int) -> float:
    """exp(mean next-token NLL) over token windows [N, T], through the model's own forward.

    Under no_grad, not inference_mode: quanto's frozen QLinear weights fail to transpose
    inside inference_mode ("Cannot set version_counter for inference tensor"; seen on the
    tiny test model's per-channel layers and on SmolLM2), which core.switching uses."""
    from core.switching import chunked_nll

    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total, predicted = 0.0, 0
    with torch.no_grad():
        for batch in tokens.to(device).split(max(1, micro_batch)):
            hidden = model.base_model(input_ids=batch, use_cache=False).last_hidden_state
            total += chunked_nll(hidden, batch, head, softcap)
            predicted += batch[:, 1:].numel()
    return math.exp(total / predicted)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def safetensors_bytes(paths: list[Path], prefixes: dict[str, str]) -> dict[str, int]:
    """Bytes of the tensors stored under each module's key prefix, biases left out, read
    from the files' headers (no tensor data is loaded). prefixes: module -> key prefix."""
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                sizes[key] = math.prod(sl.get_shape()) * _dtype_size(sl.get_dtype())
    return {name: sum(n for key, n in sizes.items() if key.startswith(prefix) and not key.endswith(".bias"))
            for name, prefix in prefixes.items()}


_SAFETENSORS_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _dtype_size(name: str) -> int:
    return _SAFETENSORS_SIZES[name]


def layer_bytes(linear_names: list[list[str]], module_bytes: dict[str, int]) -> list[int]:
    return [sum(module_bytes[n] for n in names) for names in linear_names]


def check_all_written(module_bits: dict[str, int], module_bytes: dict[str, int], what: str) -> None:
    """Every module meant to be quantized must have quantized weights in the files."""
    missing = [n for n in module_bits if not module_bytes.get(n)]
    if missing:
        raise RuntimeError(f"{what} wrote no quantized weights for {len(missing)} modules, "
                           f"e.g. {missing[:3]}")


def import_error(exporter: Exporter, exc: BaseException) -> UserError:
    return UserError(f"the {exporter.name} export needs the package {exporter.distribution}, which "
                     f"does not import here ({type(exc).__name__}: {exc}). {exporter.extra_hint}")
