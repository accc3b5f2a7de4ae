"""GPTQ export: a GPTQModel checkpoint (model.safetensors + `quantization_config` with a
per-layer `dynamic` bit-width in config.json, quantize_config.json) that GPTQModel and
vLLM load.

Of a GPTQ run (`run --backend gptq`) the export is the measured model: the run's model
is loaded in the dtype SPQE measured it in, the gptq backend is calibrated on the run's
own calibration windows (core.backends.gptq: Hessians of the unquantized model), and
core.switching.LayerSwitch builds each layer's GPTQModel modules at its bits exactly as
SPQE, eval and compare build them; those very tensors are written, with GPTQModel's own
state-dict and shard writers. No second calibration.

Of a quanto, HQQ or GGUF run the allocation came from another quantizer's errors: GPTQ is
applied afterwards by GPTQModel's whole pipeline (its sequential GPTQ, calibrated on up
to CALIB_WINDOWS windows of the run's text), and the export says so.

GPTQ checkpoints store float16 scales, and GPTQModel's kernels compute in float16: the
written model is made and evaluated in float16 whatever the run's dtype.
"""
from __future__ import annotations

import contextlib
import copy
import json
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

# GPTQ's Hessians want more tokens than SPQE's evaluations: for the export of a run of
# another backend, up to this many windows of the run's window length are cut from its
# calibration text.
CALIB_WINDOWS = 64
EXTRA_HINT = ("Install it with `pip install 'impq-tui[gptq]'` (GPTQModel 7.6.0; it pins numpy 2.2.6), "
              "or export with the quanto or hqq `backend`.")
WEIGHTS = "model.safetensors"
MAX_SHARD = 4 << 30      # GPTQModel's DEFAULT_MAX_SHARD_SIZE ("4GB")


def _prepare_environment() -> None:
    from core.backends.gptq import prepare_environment

    prepare_environment()


@contextlib.contextmanager
def _quiet_stdout():
    """GPTQModel logs to stdout; keep stdout for our own output (--json)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


class GptqExporter(Exporter):
    name = "gptq"
    distribution = "gptqmodel"
    extra_hint = EXTRA_HINT

    def __init__(self):
        self._saved: Path | None = None       # GPTQModel's own save (a run of another backend)
        self._converted: Path | None = None   # a GGUF input converted to a checkpoint
        self._measured = False                # a GPTQ run: the modules SPQE measured
        self._backend = None                  # its calibrated core.backends.gptq.GptqBackend
        self._notes: list[str] = []

    @property
    def simulates(self) -> bool:
        """De-quantized (simulated) weights exist for a GPTQ run's own export."""
        return self._measured

    def check_available(self) -> None:
        _prepare_environment()
        try:
            with _quiet_stdout():
                import gptqmodel  # noqa: F401
        except Exception as exc:  # any failure to import is a broken optional install
            raise import_error(self, exc) from None

    def eval_settings(self, config, device, **given):
        self._measured = config.backend == self.name
        return super().eval_settings(config, device, **{**given, "dtype": self.dtype(config)})

    def backend(self, config):
        return self._backend if self._backend is not None else super().backend(config)

    def load(self, config, device, dtype) -> LoadedModel:
        """A GPTQ run's model is loaded in the dtype SPQE measured it in (core.settings:
        the run's own on the run's kind of device), and the backend calibrated on the run's
        calibration windows; float16 comes after quantizing. Another run's model loads in
        `dtype` (float16), for GPTQModel to quantize."""
        self._measured = config.backend == self.name
        if not self._measured:
            return super().load(config, device, dtype)
        from core.backends import backend_for
        from core.fingerprint import check_calibration
        from core.settings import eval_settings

        loaded = super().load(config, device, eval_settings(config, device).torch_dtype)
        windows = _run_windows(loaded, config)
        check_calibration(config, windows)      # the run's own windows, or a refusal
        self._backend = backend_for(config, self.name)
        self._backend.calibrate(loaded, windows, config.micro_batch)
        return loaded

    def quantize(self, loaded, bits_per_layer, config, checkpoint, on_layer=None) -> LoadedModel:
        if not self._measured:
            return self._quantize_afterwards(loaded, bits_per_layer, config, checkpoint)
        checkpoint(f"GPTQ (GPTQModel) of each layer at its bits, from the Hessians of the run's "
                   f"{config.windows} calibration windows of {config.window_tokens} tokens "
                   "(as SPQE measured)")
        super().quantize(loaded, bits_per_layer, config, checkpoint, on_layer)
        with torch.inference_mode():
            loaded.model.to(torch.float16)      # scales are float16 already; the rest follows
        self._details = {**self._backend.settings(), "calibration_windows": config.windows,
                         "calibration_window_tokens": config.window_tokens,
                         "dynamic": self._dynamic(loaded, bits_per_layer)[1],
                         "allocation_from": "gptq"}
        self._notes = [("The quantized tensors are the ones SPQE measured for this allocation: "
                        "GPTQ (GPTQModel's quantizer) of each layer from the Hessians of the "
                        "unquantized model on the run's calibration windows, no second "
                        "calibration.")]
        return loaded

    def write(self, loaded, module_bits, folder: Path, config, checkpoint, progress) -> Written:
        checkpoint("writing model.safetensors and quantize_config.json")
        if self._measured:
            self._write_measured(loaded, module_bits, folder)
        else:
            for item in self._saved.iterdir():
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        module_bytes = safetensors_bytes([folder / f for f in files], {n: f"{n}." for n in module_bits})
        check_all_written(module_bits, module_bytes, "GPTQModel")
        return Written(module_bytes=module_bytes, weight_files=files, library=self.library_version(),
                       dtype=self.dtype(config), details=self._details, notes=list(self._notes))

    def close(self) -> None:
        for folder in (self._saved, self._converted):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._saved = self._converted = None
        self._backend = None

    # ---------------------------------------------------------------- a GPTQ run
    def _dynamic(self, loaded, bits_per_layer) -> tuple[int, dict]:
        """The base bit-width and GPTQModel's `dynamic` override for every other layer."""
        prefix = re.escape(_layers_prefix(loaded))
        base = 4 if 4 in bits_per_layer else max(bits_per_layer)
        return base, {rf"+:^{prefix}\.{i}\.": {"bits": int(bits)}
                      for i, bits in enumerate(bits_per_layer) if bits != base}

    def _write_measured(self, loaded, module_bits, folder: Path) -> None:
        """The in-memory GPTQModel modules written as GPTQModel's save_quantized writes a
        checkpoint: config.json with `quantization_config`, quantize_config.json, and the
        state dict (zero points in the on-disk "v1" layout) through its shard writer."""
        from gptqmodel.utils.model import get_state_dict_for_save, streaming_state_dict_to_shards

        from core.backends.gptq import library_version

        backend = self._backend
        bits = [module_bits[names[0]] for names in loaded.linear_names]
        base, dynamic = self._dynamic(loaded, bits)
        qcfg = backend.quantize_config(base)
        qcfg.dynamic = dynamic or None
        qcfg.meta_set_versionable(key="quantizer", value=[f"gptqmodel:{library_version()}",
                                                          f"impq-tui:{_impq_version()}"])
        for key, value in (("uri", "https://github.com/modelcloud/gptqmodel"),
                           ("damp_percent", qcfg.damp_percent),
                           ("damp_auto_increment", qcfg.damp_auto_increment),
                           ("static_groups", qcfg.static_groups), ("true_sequential", False),
                           ("mse", qcfg.mse), ("act_group_aware", qcfg.act_group_aware)):
            qcfg.meta_set(key=key, value=value)
        config = copy.deepcopy(loaded.model.config)
        config.dtype = torch.float16
        config.quantization_config = qcfg.to_dict()
        with _quiet_stdout():
            config.save_pretrained(str(folder))
            if getattr(loaded.model, "generation_config", None) is not None:
                loaded.model.generation_config.save_pretrained(str(folder))
            qcfg.save_pretrained(str(folder))
        modules = {n: loaded.model.get_submodule(n) for n in module_bits}
        kept = {n: m.qzeros for n, m in modules.items()}
        try:
            for name, module in modules.items():
                module.qzeros = backend.checkpoint_qzeros(module)
            state = get_state_dict_for_save(loaded.model)
            with _quiet_stdout():
                files, where, total = streaming_state_dict_to_shards(
                    state, save_dir=str(folder), model_base_name="model", single_file_name=WEIGHTS,
                    metadata={"format": "pt"}, max_shard_size=MAX_SHARD)
            state.clear()
        finally:
            for name, module in modules.items():
                module.qzeros = kept[name]
                module._stream_reset_cache()
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": where}
            (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ---------------------------------------------------------------- another backend's run
    def _quantize_afterwards(self, loaded, bits_per_layer, config, checkpoint) -> LoadedModel:
        """GPTQ of every decoder layer at its bits, through GPTQModel from the run's
        checkpoint, calibrated on the run's calibration text; then saved once (GPTQModel
        converts its zero points to the layout its kernels compute with only on load) so
        that eval measures, and write() copies, the very same tensors."""
        from gptqmodel import GPTQModel, QuantizeConfig

        source = self._checkpoint(config)
        base, dynamic = self._dynamic(loaded, bits_per_layer)
        quantize_config = QuantizeConfig(bits=base, group_size=config.group_size, dynamic=dynamic or None,
                                         desc_act=False, sym=True, offload_to_disk=False)
        calibration = self._calibration(loaded.tokenizer, config)
        device, dtype = loaded.device, loaded.dtype
        loaded.model = None                      # one copy of the weights at a time
        other = (f"This allocation was chosen from {config.backend}'s quantization errors "
                 f"(run backend {config.backend}), not GPTQ's: GPTQ was applied afterwards by "
                 f"GPTQModel's own pipeline, with its own calibration on {len(calibration)} windows "
                 f"of the run's text. For an allocation measured with GPTQ, run SPQE with "
                 "`--backend gptq`.")
        checkpoint(other)
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
                         "dynamic": gptq.quantize_config.dynamic or {},
                         "allocation_from": config.backend}
        self._notes = [other]
        return replace(loaded, model=model, layers=decoder_layers(model))

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


def _run_windows(loaded: LoadedModel, config) -> torch.Tensor:
    """The run's calibration windows, as core.engine.prepare cut them."""
    if loaded.tokenizer is None:     # random:<shape>: token ids drawn from the run's seed
        return torch.randint(0, loaded.model.config.vocab_size, (config.windows, config.window_tokens),
                             generator=torch.Generator().manual_seed(config.seed))
    return token_windows(load_text(config.calib_text, "calibration"), loaded.tokenizer,
                         config.windows, config.window_tokens, config.seed)


def _impq_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("impq-tui")
    except importlib.metadata.PackageNotFoundError:
        return "source"


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
