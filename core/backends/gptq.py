"""GPTQ through GPTQModel's own quantizer, once per precision, for SPQE.

Each decoder linear is quantized by GPTQModel's `GPTQ` class (gptqmodel.quantization.gptq:
its Hessian accumulation, damping, column loop and group scales; sym, no act-order, its
default act-group-aware ordering) and packed by its `TorchLinear` module into the GPTQ
checkpoint layout: `qweight`, `qzeros`, `scales` (float16), `g_idx`. That packed module
is the real module (what compare measures, what `export --backend gptq` writes); the
weight it de-quantizes to is what SPQE swaps in; its bytes are the four tensors'.

Which inputs the Hessians come from: each linear's inputs under the UNQUANTIZED model,
on the run's calibration windows. GPTQModel itself quantizes sequentially (a layer's
inputs come from the already quantized layers before it), which ties a layer's result
to one particular state of the earlier layers. SPQE visits every mix of precisions and
needs each layer quantized once per precision, independently of the others; so every
layer sees the inputs of the model as it was loaded, as llama.cpp's importance matrix
does for the gguf backend.

Memory: Hessians are held for one decoder layer at a time (an 8B layer's are about
1.2 GB in float32), on the model's device. `calibrate` runs the decoder once to record
the hidden states entering layer 0 and each layer's keyword arguments (masks, rotary
embeddings); then, when LayerSwitch quantizes layer i (it builds layers in order, before
swapping them), the unquantized layer i runs on the recorded hidden states, its linears'
Hessians are accumulated by GPTQModel's `GPTQ.add_batch`, and its outputs become the
inputs of layer i+1. A new pass from layer 0 (eval builds the simulated model, then the
real one) starts again from the recorded inputs of layer 0.

Deterministic: the same model, dtype, device, windows and micro-batch give bit-identical
Hessians and packed tensors, so eval, compare and export rebuild what SPQE measured.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
from types import SimpleNamespace

import torch
from torch import nn

from core.backends import BITS_OF
from core.backends.base import Backend, linear_holding
from core.errors import InvalidField, UserError

# The group sizes GPTQModel's TorchLinear packs (its SUPPORTS_GROUP_SIZE, less -1).
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
WORD = 32   # GPTQ packs codes and zero points into 32-bit words: both dimensions must fill them
INSTALL_HINT = ("Install it with `pip install 'impq-tui[gptq]'` (GPTQModel 7.6.0; it pins "
                "numpy 2.2.6), or choose the quanto or hqq `backend`.")
PACKED = ("qweight", "qzeros", "scales", "g_idx")   # what a GPTQ checkpoint stores per linear


def prepare_environment() -> None:
    """GPTQModel's settings that must be in place before it is imported."""
    # It sizes its CPU thread pool to half the cores and then asks for two workers in a
    # sub-pool: below four cores that fails unless this is at least 2.
    if int(os.environ.get("GPTQMODEL_CPU_WORKERS", "0") or 0) < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
    # Pack with its Python packer rather than JIT-compiling its C++ one (minutes, and a
    # compiler) on first use; both write the same words.
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")


@contextlib.contextmanager
def quiet_stdout():
    """GPTQModel logs to stdout; keep stdout for our own output (--json)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def gptqmodel():
    """The few GPTQModel names this backend uses (importing gptqmodel takes seconds)."""
    prepare_environment()
    try:
        with quiet_stdout():
            from gptqmodel.nn_modules.qlinear.torch import TorchLinear
            from gptqmodel.quantization import QuantizeConfig
            from gptqmodel.quantization.config import FORMAT
            from gptqmodel.quantization.gptq import GPTQ
            from gptqmodel.utils.model import (
                convert_gptq_v1_to_v2_format_module,
                convert_gptq_v2_to_v1_format_module,
            )
    except Exception as exc:   # any failure to import is a broken optional install
        raise UserError(f"the gptq backend needs GPTQModel, which does not import here "
                        f"({type(exc).__name__}: {exc}). {INSTALL_HINT}") from None
    return SimpleNamespace(GPTQ=GPTQ, QuantizeConfig=QuantizeConfig, TorchLinear=TorchLinear,
                           FORMAT=FORMAT, v1_to_v2=convert_gptq_v1_to_v2_format_module,
                           v2_to_v1=convert_gptq_v2_to_v1_format_module)


def library_version() -> str:
    try:
        return importlib.metadata.version("gptqmodel")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise InvalidField("group_size", f"{group_size} is not a group size GPTQ checkpoints use; "
                                         f"choose one of {', '.join(map(str, GROUP_SIZES))}.")


class GptqBackend(Backend):
    name = "gptq"
    BITS = BITS_OF["gptq"]

    def __init__(self, group_size: int = 128):
        super().__init__(group_size)
        check_group_size(group_size)
        self.lib = gptqmodel()
        self.calibration: _Hessians | None = None

    # ------------------------------------------------------------ the settings
    def quantize_config(self, bits: int):
        """GPTQModel's own defaults (symmetric, no act-order, act-group-aware, damping
        0.05) at `bits` and the run's group size; nothing offloaded to disk."""
        return self.lib.QuantizeConfig(bits=bits, group_size=self.group_size, desc_act=False,
                                       sym=True, offload_to_disk=False)

    def settings(self) -> dict:
        """The settings an export records (`quantization` in allocation.json)."""
        cfg = self.quantize_config(4)
        return {"quantizer": f"GPTQModel {library_version()} (gptqmodel.quantization.gptq.GPTQ)",
                "group_size": self.group_size, "sym": cfg.sym, "desc_act": cfg.desc_act,
                "act_group_aware": bool(cfg.act_group_aware), "damp_percent": cfg.damp_percent,
                "damp_auto_increment": cfg.damp_auto_increment,
                "hessian_inputs": "each linear's inputs under the unquantized model, on the "
                                  "run's calibration windows"}

    def _check(self, shape: torch.Size, bits: int, what: str) -> None:
        super()._check(shape, bits, what)
        out_features, in_features = shape[0], shape[1]
        for label, n in (("input", in_features), ("output", out_features)):
            if n % WORD:
                raise UserError(f"GPTQ cannot pack {what} (shape {tuple(shape)}): its {n} {label} "
                                f"features are not a multiple of {WORD}, the codes per 32-bit word "
                                "GPTQ checkpoints store; choose the quanto or hqq `backend`.")

    # ------------------------------------------------------------ calibration
    def calibrate(self, loaded, windows: torch.Tensor, micro_batch: int = 8) -> None:
        """Record what each decoder layer's unquantized inputs are computed from (see the
        module doc); Hessians follow one layer at a time as LayerSwitch asks for them."""
        self.calibration = _Hessians(self.lib, self.quantize_config(4), loaded, windows, micro_batch)

    # ------------------------------------------------------------ quantizing
    def _quantize_linear(self, linear: nn.Linear, bits: int):
        if self.calibration is None:
            raise RuntimeError("the gptq backend quantizes from Hessians: call calibrate() first")
        weight = linear.weight
        hessian, samples = self.calibration.hessian(linear)
        task = self.lib.GPTQ(linear_holding(weight), self.quantize_config(bits))
        task.quantizer.configure(perchannel=True)       # as GPTQModel's GPTQProcessor does
        task.H, task.nsamples, task.expected_nsamples = hessian.clone(), samples, samples
        with quiet_stdout():
            q, scales, zeros, g_idx, *_ = task.quantize()
        module = self.lib.TorchLinear(bits=bits, group_size=self.group_size, sym=True,
                                      desc_act=False, in_features=weight.shape[1],
                                      out_features=weight.shape[0], bias=False,
                                      pack_dtype=torch.int32, register_buffers=False,
                                      format=self.lib.FORMAT.GPTQ)
        # GPTQModel's pack_module: the GPTQ-rounded weight in the model's dtype, on CPU
        # (pack_block) or the GPU (pack_gpu); the zero points come out in the layout its
        # kernels compute with ("v2"); export writes them in the checkpoint's ("v1").
        holder = linear_holding(q)
        packed = False
        if weight.device.type == "cuda":
            try:
                module.pack_gpu(holder, scales, zeros, g_idx, device=weight.device)
                packed = True
            except ValueError:      # as pack_module: shapes its GPU packer refuses go to the CPU one
                pass
        if not packed:
            module.pack_block(linear_holding(q.cpu()), scales.cpu(), zeros.cpu(), g_idx.cpu())
        module.qzero_format(format=2)
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                    requires_grad=False)
        module = module.to(weight.device).eval().requires_grad_(False)
        module.impq_dtype = weight.dtype
        return module

    def _dequantize(self, module) -> torch.Tensor:
        with torch.no_grad():
            return module.dequantize_weight().t().to(module.impq_dtype).contiguous()

    def module_nbytes(self, module) -> int:
        return sum(getattr(module, name).numel() * getattr(module, name).element_size()
                   for name in PACKED)

    def checkpoint_qzeros(self, module) -> torch.Tensor:
        """The module's zero points in GPTQ's on-disk ("v1") layout, as GPTQModel's
        pack_module leaves them for saving; the module keeps its own ("v2")."""
        kept = module.qzeros
        module.qzeros = kept.clone()
        try:
            with quiet_stdout():
                self.lib.v2_to_v1(module, self.quantize_config(module.bits))
            return module.qzeros
        finally:
            module.qzeros = kept
            module._stream_reset_cache()


class _Hessians:
    """Per decoder layer, in order: each linear's Hessian (GPTQModel's 2/n sum x x^T in
    float32, accumulated by its GPTQ.add_batch) from the unquantized model's inputs."""

    def __init__(self, lib, config, loaded, windows: torch.Tensor, micro_batch: int):
        if loaded.materialize is not None:
            raise UserError("the gptq backend computes its Hessians on the whole unquantized "
                            "model, which is built one layer at a time here; use hqq or quanto.")
        self.lib, self.config = lib, config     # a QuantizeConfig: GPTQ's accumulation reads only its `hessian`
        self.layers, self.names = loaded.layers, loaded.linear_names
        model = loaded.model
        self.index = {}          # weight storage -> (layer, name)
        for i, names in enumerate(self.names):
            for name in names:
                self.index[_key(model.get_submodule(name))] = (i, name)
        self.modules = [[model.get_submodule(n) for n in names] for names in self.names]
        self.first: list[torch.Tensor] = []     # per micro-batch: the hidden states entering layer 0
        self.kwargs: list[list[dict]] = []      # per micro-batch, per layer: its keyword arguments
        L = len(self.layers)
        with torch.inference_mode():
            for batch in windows.to(loaded.device).split(max(1, micro_batch)):
                inputs, kwargs = [None] * L, [None] * L
                hooks = [layer.register_forward_pre_hook(_recorder(j, inputs, kwargs), with_kwargs=True)
                         for j, layer in enumerate(self.layers)]
                try:
                    model.get_decoder()(input_ids=batch, use_cache=False)
                finally:
                    for hook in hooks:
                        hook.remove()
                self.first.append(inputs[0])
                self.kwargs.append(kwargs)
        self.layer = -1                          # the layer whose Hessians are held
        self.held: dict[str, tuple[torch.Tensor, int]] = {}
        self.hidden: list[torch.Tensor] | None = None   # inputs of layer self.layer + 1

    def hessian(self, linear: nn.Module) -> tuple[torch.Tensor, int]:
        found = self.index.get(_key(linear))
        if found is None:
            raise RuntimeError(f"the gptq backend was calibrated on another model: no Hessian for "
                               f"a {tuple(linear.weight.shape)} linear")
        i, name = found
        if i != self.layer:
            self._collect(i)
        return self.held[name]

    def _collect(self, i: int) -> None:
        if i == 0:
            hidden = self.first
        elif i == self.layer + 1 and self.hidden is not None:
            hidden = self.hidden
        else:
            raise RuntimeError(f"GPTQ Hessians are collected layer by layer in order: layer {i} "
                               f"was asked for after layer {self.layer}")
        self.held, self.hidden = {}, None
        tasks = {name: self.lib.GPTQ(linear_holding(m.weight), self.config)
                 for name, m in zip(self.names[i], self.modules[i])}
        hooks = [m.register_forward_pre_hook(_accumulate(tasks[name]))
                 for name, m in zip(self.names[i], self.modules[i])]
        outputs = []
        try:
            with torch.inference_mode():
                for b, h in enumerate(hidden):
                    out = self.layers[i](h, **self.kwargs[b][i])
                    outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            for hook in hooks:
                hook.remove()
        for name, task in tasks.items():
            hessian = task.finalize_hessian()
            self.held[name] = (hessian, task.nsamples)
        self.layer, self.hidden = i, outputs


def _accumulate(task):
    def hook(_module, args):
        task.add_batch(args[0].detach(), None)
    return hook


def _recorder(j: int, inputs: list, kwargs: list):
    def hook(_module, args, kw):
        kw = dict(kw)
        inputs[j] = args[0] if args else kw.pop("hidden_states")
        kwargs[j] = kw
    return hook


def _key(linear: nn.Module) -> tuple:
    """A linear's weight storage and shape: the same for a stand-in sharing its weight."""
    return linear.weight.data_ptr(), tuple(linear.weight.shape)
