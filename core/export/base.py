"""What every export backend provides: load the model, quantize it for an allocation,
write it, measure the written quantized weights, and say how to load it back."""
from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from core import events
from core.backends import get_backend
from core.errors import UserError
from core.models import LoadedModel, load_model
from core.runs import RunConfig
from core.settings import EvalSettings, eval_settings
from core.switching import LayerSwitch


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
    """A quantized-model format: how the run's model is loaded and quantized for an
    allocation (eval measures exactly this model), and how it is written and loaded back."""
    name: str
    distribution: str      # the PyPI package that loads this format
    extra_hint: str = ""   # how to install it when missing
    simulates = True       # SPQE's de-quantized weights exist for this backend

    def check_available(self) -> None:
        """Raise a UserError when the library cannot be used here."""

    def backend(self, config: RunConfig):
        return get_backend(self.name, config.group_size)

    def eval_settings(self, config: RunConfig, device: torch.device, **given) -> EvalSettings:
        """The evaluation settings of core.settings; a format that computes in one dtype
        only overrides its dtype."""
        return eval_settings(config, device, **given)

    def load(self, config: RunConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """The run's model, unquantized; refused when its files changed since the run."""
        from core.fingerprint import check_model

        check_model(config)
        return load_model(config.model, device, dtype)

    def quantize(self, loaded: LoadedModel, bits_per_layer: list[int], config: RunConfig,
                 checkpoint: Callable[[str], None],
                 on_layer: Callable[[int, int], None] | None = None) -> LoadedModel:
        """The quantized model: each decoder layer's linears become the library's real
        modules at its bits, built by core.switching.LayerSwitch as SPQE, eval and compare
        build them (in place here; a format may return another model). `on_layer(i, L)`
        after each layer: progress, and a cancel that stops between layers."""
        LayerSwitch(loaded, self.backend(config), real=True, levels=[[b] for b in bits_per_layer],
                    on_layer=on_layer)
        return loaded

    def close(self) -> None:
        """Remove what load() or quantize() left behind (temporary checkpoints)."""

    @abstractmethod
    def write(self, loaded: LoadedModel, module_bits: dict[str, int], folder: Path,
              config: RunConfig, checkpoint: Callable[[str], None],
              progress: events.Substep) -> Written:
        """Save the quantized loaded.model in the library's own format into folder
        (config.json included). `checkpoint(message)` logs a step, `progress(done, total,
        what)` reports progress within one (events.Phases.log and .substep); both stop the
        export once it is cancelled."""

    @abstractmethod
    def snippet(self, path: str, dtype: str) -> str:
        """Python that loads the export at `path` with the library's public API into
        `model`, `tokenizer`. The path goes in as a Python literal (repr), never as code."""

    def over_budget_hint(self, config: RunConfig) -> str:
        return ("Export with the run's own backend, or choose lower `bits` so that the "
                "allocation leaves room.")

    def library_version(self) -> str:
        try:
            return f"{self.distribution} {importlib.metadata.version(self.distribution)}"
        except importlib.metadata.PackageNotFoundError:
            return self.distribution


def check_layers(loaded: LoadedModel, L: int, model: str) -> None:
    """The model loaded now has the run's L decoder layers (eval and export alike)."""
    if len(loaded.layers) != L:
        raise UserError(f"the run measured {L} decoder layers, the model {model} now has "
                        f"{len(loaded.layers)}: the model changed since the run.")


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


@contextlib.contextmanager
def writing(folder: Path, out: Path):
    """Write failures of the libraries' own writers as one message: safetensors raises
    SafetensorError ("... (os error 28)"), torch's zip writer a RuntimeError without the
    errno, transformers and the tokenizers an OSError. `folder` is where the export is
    being written (removed by the caller), `out` the folder asked for."""
    try:
        yield
    except (OSError, RuntimeError, *_safetensors_error()) as exc:
        code = write_errno(exc, folder)
        if code is None:
            raise
        from core.files import WHY

        hint = ("choose a shorter `out`" if code == errno.ENAMETOOLONG else
                "make room or fix the permissions, or choose another `out`")
        raise UserError(f"cannot write the export into {out.parent}: "
                        f"{WHY.get(code, os.strerror(code))} (nothing was changed: the partly "
                        f"written export was removed). {hint[0].upper() + hint[1:]}; then export "
                        "again.") from None


def write_errno(exc: BaseException, folder: Path) -> int | None:
    """The errno behind a library's write error, None when it is not one."""
    if isinstance(exc, OSError):
        return exc.errno
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        return int(found.group(1))
    if isinstance(exc, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter|"
                                                   r"file write failed", str(exc)):
        # torch's zip writer keeps no errno: a full disk is the usual cause, ask it.
        try:
            space = os.statvfs(folder)
            return errno.ENOSPC if space.f_bavail * space.f_frsize < (1 << 20) else errno.EIO
        except OSError:
            return errno.EIO
    return None


def _safetensors_error() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return ()
    return (SafetensorError,)


def import_error(exporter: Exporter, exc: BaseException) -> UserError:
    return UserError(f"the {exporter.name} export needs the package {exporter.distribution}, which "
                     f"does not import here ({type(exc).__name__}: {exc}). {exporter.extra_hint}")
