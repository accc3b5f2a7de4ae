"""GPTQ through GPTQModel: 4-bit base config, a `dynamic` override {"bits": b} for each
decoder layer at another precision, calibrated on the run's calibration text, saved
in GPTQ's checkpoint format (model.safetensors + quantization_config in config.json)
that GPTQModel and vLLM load.

GPTQModel leaves the model it has just quantized with its zero points in the on-disk
("v1") layout that its kernels do not compute with; its loader converts them. To
evaluate the in-memory model, this module does the same conversion after saving.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from core.data import load_text, token_windows
from core.export.base import (
    Exporter,
    Written,
    check_all_written,
    import_error,
    safetensors_bytes,
)
from core.models import (
    EMBEDDED,
    LoadedModel,
    decoder_layers,
    embedded_checkpoint,
    load_model,
)

# GPTQ's Hessians want more tokens than SPQE's evaluations: up to this many windows of
# the run's window length are cut from its calibration text.
CALIB_WINDOWS = 64
EXTRA_HINT = ("Install it with `pip install 'impq-tui[gptq]'` (GPTQModel 7.6.0; it pins numpy 2.2.6), "
              "or export with the quanto or hqq `backend`.")


def _prepare_environment() -> None:
    # GPTQModel sizes its CPU thread pool to half the cores and then asks for two
    # workers in a sub-pool: below four cores that fails unless this is at least 2.
    if int(os.environ.get("GPTQMODEL_CPU_WORKERS", "0") or 0) < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


@contextlib.contextmanager
def _quiet_stdout():
    """GPTQModel logs to stdout; keep stdout for our own output (--json)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class GptqExporter(Exporter):
    name = "gptq"
    distribution = "gptqmodel"
    extra_hint = EXTRA_HINT
    simulates = False     # SPQE does not measure GPTQ layers (yet): no simulated model

    def __init__(self):
        self._saved: Path | None = None       # GPTQModel's own save of the quantized model
        self._converted: Path | None = None   # a GGUF input converted to a checkpoint

    def check_available(self) -> None:
        _prepare_environment()
        try:
            with _quiet_stdout():
                import gptqmodel  # noqa: F401
        except Exception as exc:  # any failure to import is a broken optional install
            raise import_error(self, exc) from None

    def eval_settings(self, config, device, **given):
        return super().eval_settings(config, device, **{**given, "dtype": self.dtype(config)})

    def quantize(self, loaded, bits_per_layer, config, checkpoint, on_layer=None) -> LoadedModel:
        """GPTQ of every decoder layer at its bits, through GPTQModel from the run's
        checkpoint, calibrated on the run's calibration text; then saved once (GPTQModel
        converts its zero points to the layout its kernels compute with only on load) so
        that eval measures, and write() copies, the very same tensors."""
        from gptqmodel import GPTQModel, QuantizeConfig

        source = self._checkpoint(config)
        prefix = re.escape(_layers_prefix(loaded))
        base = 4 if 4 in bits_per_layer else max(bits_per_layer)   # other layers: a `dynamic` override
        dynamic = {rf"+:^{prefix}\.{i}\.": {"bits": int(bits)}
                   for i, bits in enumerate(bits_per_layer) if bits != base}
        quantize_config = QuantizeConfig(bits=base, group_size=config.group_size, dynamic=dynamic or None,
                                         desc_act=False, sym=True, offload_to_disk=False)
        calibration = self._calibration(loaded.tokenizer, config)
        device, dtype = loaded.device, loaded.dtype
        loaded.model = None                      # one copy of the weights at a time
        with _quiet_stdout():
            gptq = GPTQModel.load(source, quantize_config, device=str(device), dtype=dtype)
            checkpoint(f"GPTQ on {len(calibration)} calibration windows of {config.window_tokens} tokens")
            gptq.quantize(calibration, batch_size=max(1, config.micro_batch))
            self._saved = Path(tempfile.mkdtemp(prefix="impq-gptq-"))
            gptq.save(str(self._saved))
        (self._saved / "quant_log.csv").unlink(missing_ok=True)   # GPTQModel's log, not the model
        model = gptq.model.eval()
        quantized = _quantized_modules(model)
        wanted = {n: b for names, b in zip(loaded.linear_names, bits_per_layer) for n in names}
        wrong = {n: (quantized[n].bits if n in quantized else None, b)
                 for n, b in wanted.items() if n not in quantized or quantized[n].bits != b}
        if wrong:
            raise RuntimeError(f"GPTQModel's dynamic override gave other bit-widths than asked "
                               f"(module: (got, asked)): {dict(list(wrong.items())[:4])}")
        with _quiet_stdout():
            self._ready_for_inference(quantized.values())
        self._details = {"group_size": config.group_size, "sym": True, "desc_act": False,
                         "calibration_windows": len(calibration),
                         "calibration_window_tokens": config.window_tokens,
                         "dynamic": gptq.quantize_config.dynamic or {}}
        return replace(loaded, model=model, layers=decoder_layers(model))

    def write(self, loaded, module_bits, folder: Path, config, checkpoint) -> Written:
        checkpoint("writing model.safetensors and quantize_config.json")
        for item in self._saved.iterdir():
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        module_bytes = safetensors_bytes([folder / f for f in files], {n: f"{n}." for n in module_bits})
        check_all_written(module_bits, module_bytes, "GPTQModel")
        return Written(module_bytes=module_bytes, weight_files=files, library=self.library_version(),
                       dtype=self.dtype(config), details=self._details)

    def close(self) -> None:
        for folder in (self._saved, self._converted):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._saved = self._converted = None

    def snippet(self, path: str, dtype: str) -> str:
        return _SNIPPET.format(path=repr(path), dtype=dtype)

    def over_budget_hint(self, config) -> str:
        return "Choose lower `bits`."

    @staticmethod
    def dtype(config) -> str:
        # GPTQ checkpoints store their scales in float16, the dtype vLLM's and GPTQModel's
        # GPTQ kernels compute in. A model loaded in bfloat16 rounds those scales to
        # bfloat16 on load (its 8-bit mantissa): measured on the embedded model at 2.5
        # bits, that moved perplexity by 8% against the model as quantized. So GPTQ
        # models are made, evaluated and loaded in float16 whatever the run's dtype.
        return "float16"

    # ---------------------------------------------------------------- helpers
    def _checkpoint(self, config) -> str:
        """A checkpoint GPTQModel can read: a local folder or hub id as is, the embedded
        model's converted folder, or a GGUF file converted to a temporary one."""
        spec = config.model or EMBEDDED
        if spec == EMBEDDED:
            return str(embedded_checkpoint())
        if spec.endswith(".gguf"):
            loaded = load_model(spec, torch.device("cpu"), torch.float32)
            self._converted = Path(tempfile.mkdtemp(prefix="impq-gguf-"))
            loaded.model.save_pretrained(self._converted)
            loaded.tokenizer.save_pretrained(self._converted)
            return str(self._converted)
        return os.path.expanduser(spec)

    @staticmethod
    def _calibration(tokenizer, config) -> list[dict]:
        text = load_text(config.calib_text, "calibration")
        T = config.window_tokens
        available = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) // T
        n = max(1, min(max(config.windows, CALIB_WINDOWS), available))
        windows = token_windows(text, tokenizer, n, T, config.seed)
        return [{"input_ids": w.tolist(), "attention_mask": [1] * T} for w in windows]

    @staticmethod
    def _ready_for_inference(modules) -> None:
        from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

        for module in modules:
            if module.qzero_format() == 1:
                convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
                module.qzero_format(format=2)


def _layers_prefix(loaded: LoadedModel) -> str:
    """The qualified name of the ModuleList holding the decoder layers (model.layers)."""
    names = {module: name for name, module in loaded.model.named_modules()}
    return names[loaded.layers[0]].rpartition(".")[0]


def _quantized_modules(model) -> dict:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


_SNIPPET = '''\
import os

import torch
from transformers import AutoTokenizer

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")   # GPTQModel 7.6 needs >= 2 on small CPUs
from gptqmodel import BACKEND, GPTQModel

path = {path}   # this folder (change it if you move the folder)
device = "cuda" if torch.cuda.is_available() else "cpu"
# On CPU the plain-PyTorch kernel runs 2- and 4-bit layers alike; on a GPU GPTQModel picks.
quantized = GPTQModel.load(path, device=device, dtype=torch.{dtype},
                           backend=BACKEND.TORCH if device == "cpu" else BACKEND.AUTO)
model = quantized.model   # the transformers model inside, with GPTQ linear layers
model.eval()
tokenizer = AutoTokenizer.from_pretrained(path)
'''
