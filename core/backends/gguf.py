"""GGUF: each linear quantized by llama.cpp's own code (ggml, the library bundled with
llama-cpp-python), to a low and a high llama.cpp type.

ggml's `ggml_quantize_chunk` quantizes a weight to a GGUF type (with the importance
matrix, when the backend was calibrated: core.imatrix) and the type's `to_float` gives
the weight back; both are called through ctypes on the bundled libggml-base, so the
bytes are the ones `llama-quantize` writes for the same weight and importance matrix.
gguf-py's numpy quantizers are not used: they cover only the legacy types (Q4_0..Q8_0),
not the K-quants and IQ types.

The engine's two levels map to the type pair: `bits` 2 is the low type (default Q2_K),
4 the high type (default Q4_K), so a budget of b bits lies the same fraction of the way
from all-low bytes to all-high bytes as b does from 2 to 4. A weight whose rows
(input features) are not a multiple of the type's block (256 for K-quants and most IQ
types) takes the type llama.cpp's quantize falls back to (`tensor_type_fallback` in
llama.cpp's src/llama-quant.cpp): the simulation uses it, the bytes are its, and
`fallbacks()` says which weights took which type.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.backends.base import Backend
from core.errors import InvalidField, UserError

LOW_TYPE, HIGH_TYPE = "Q2_K", "Q4_K"
# The type each level (`levels`, in bits) stands for unless the user names the types.
TYPE_OF_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
LEVELS = tuple(TYPE_OF_BITS)

# The types a user may pick: the K-quants, Q8_0 and the IQ types. Those in
# NEEDS_IMATRIX are the ones llama.cpp refuses to make without an importance matrix
# (`tensor_requires_imatrix`); this backend always has one once calibrated.
TYPE_CHOICES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0",
                "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL")
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp, llama-cpp-python 0.3.36): the
# type used where a tensor's rows are not a multiple of the target type's block. When the
# fallback's block does not divide them either, llama.cpp stores F16.
FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL",
            "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
            "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

INSTALL_HINT = ("Install it with `pip install 'impq-tui[gguf]'` (llama-cpp-python builds "
                "llama.cpp from source: about 8 minutes on 2 cores), or choose the quanto or "
                "hqq `backend`.")


def parse_types(spec: str | tuple | list | None, levels=(2, 4)) -> tuple[str, ...]:
    """One type per level, from the lowest: from "Q2_K,Q4_K" (commas, slashes or spaces)
    or a sequence; None takes TYPE_OF_BITS (Q2_K and Q4_K for the paper's 2 and 4 bits).
    Each type must store fewer bytes per weight than the next."""
    levels = tuple(levels or (2, 4))
    if spec is None or spec == "":
        return tuple(TYPE_OF_BITS[b] for b in levels)
    parts = re.split(r"[,/\s]+", spec) if isinstance(spec, str) else list(spec)
    parts = [p.strip().upper() for p in parts if p.strip()]
    if len(parts) != len(levels):
        what = ("two GGUF types, the low and the high one (e.g. Q2_K Q4_K)" if len(levels) == 2
                else f"{len(levels)} GGUF types, one per level {' '.join(map(str, levels))}")
        raise InvalidField("gguf_types", f"needs {what}, got {len(parts)}.")
    for name in parts:
        if name not in TYPE_CHOICES:
            raise InvalidField("gguf_types", f"{name!r} is not a type this backend quantizes to; "
                                             f"choose among {', '.join(TYPE_CHOICES)}.")
    for low, high in zip(parts, parts[1:]):
        if bits_per_weight(low) >= bits_per_weight(high):
            raise InvalidField("gguf_types", f"the type {low} ({bits_per_weight(low):.4g} bits per "
                                             f"weight) must be smaller than the next, {high} "
                                             f"({bits_per_weight(high):.4g}); give the low one first.")
    return tuple(parts)


def bits_per_weight(type_name: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * size / block


def tensor_nbytes(type_name: str, rows: int, row_length: int) -> int:
    """Bytes of a [rows, row_length] tensor of this type in a GGUF file (gguf-py's table)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return rows * (row_length // block) * size


def fallback_type(type_name: str, row_length: int) -> str:
    """The type llama.cpp's quantize stores for `type_name` on rows of `row_length`."""
    import gguf

    def block(name: str) -> int:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0]

    if row_length % block(type_name) == 0:
        return type_name
    fallback = FALLBACK.get(type_name, type_name)
    return fallback if row_length % block(fallback) == 0 else "F16"


# ------------------------------------------------------------------ ggml through ctypes

class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_FLOATS = ctypes.POINTER(ctypes.c_float)


class Ggml:
    """ggml's quantize and dequantize routines from the libraries llama-cpp-python ships.
    ctypes releases the GIL during each call, so rows are quantized on several threads."""

    def __init__(self):
        try:
            import llama_cpp
        except Exception as exc:   # any failure to import is a broken optional install
            raise UserError(f"the gguf backend needs llama-cpp-python, which does not import here "
                            f"({type(exc).__name__}: {exc}). {INSTALL_HINT}") from None
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        names = sorted(lib_dir.glob("libggml-base.*")) or sorted(lib_dir.glob("libggml.*"))
        if not names:
            raise UserError(f"llama-cpp-python's ggml library was not found in {lib_dir}. "
                            f"{INSTALL_HINT}")
        lib = ctypes.CDLL(str(names[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _FLOATS, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, _FLOATS]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.lib = lib
        self.version = llama_cpp.__version__
        self.threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1)

    @staticmethod
    def type_id(type_name: str) -> int:
        import gguf

        return int(gguf.GGMLQuantizationType[type_name])

    def row_size(self, type_name: str, row_length: int) -> int:
        return int(self.lib.ggml_row_size(self.type_id(type_name), row_length))

    def quantize(self, type_name: str, weight: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """weight [rows, n] float32 -> the GGUF bytes [rows, row_size] (uint8)."""
        weight = np.ascontiguousarray(weight, dtype=np.float32)
        rows, n = weight.shape
        row_size = self.row_size(type_name, n)
        out = np.empty((rows, row_size), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            qw = imatrix.ctypes.data_as(_FLOATS)
        kind = self.type_id(type_name)

        def chunk(bounds: tuple[int, int]) -> int:
            start, stop = bounds
            return self.lib.ggml_quantize_chunk(kind, weight[start:stop].ctypes.data_as(_FLOATS),
                                                out[start:stop].ctypes.data, 0, stop - start, n, qw)

        written = sum(self._map(chunk, rows))
        if written != out.nbytes:
            raise RuntimeError(f"ggml quantized {written} bytes to {type_name}, expected {out.nbytes}")
        return out

    def dequantize(self, type_name: str, data: np.ndarray, row_length: int) -> np.ndarray:
        """GGUF bytes [rows, row_size] -> float32 [rows, row_length], by the type's to_float."""
        data = np.ascontiguousarray(data)
        rows = data.shape[0]
        out = np.empty((rows, row_length), dtype=np.float32)
        traits = self.lib.ggml_get_type_traits(self.type_id(type_name)).contents
        to_float = _TO_FLOAT(traits.to_float)

        def chunk(bounds: tuple[int, int]) -> int:
            start, stop = bounds
            to_float(data[start:stop].ctypes.data, out[start:stop].ctypes.data_as(_FLOATS),
                     (stop - start) * row_length)
            return 0

        self._map(chunk, rows)
        return out

    def _map(self, fn, rows: int) -> list:
        step = max(1, -(-rows // self.threads))
        bounds = [(s, min(rows, s + step)) for s in range(0, rows, step)]
        if len(bounds) == 1:
            return [fn(bounds[0])]
        with ThreadPoolExecutor(len(bounds)) as pool:
            return list(pool.map(fn, bounds))


@functools.cache
def ggml() -> Ggml:
    return Ggml()


# ------------------------------------------------------------------ the backend

class GgufLinear(nn.Module):
    """One linear as a GGUF tensor: its bytes (`data`, exactly what the file stores), its
    type, and the weight they decode to, which the forward computes with."""

    def __init__(self, ggml_type: str, data: np.ndarray, weight: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.ggml_type = ggml_type
        self.data = data
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, type={self.ggml_type}"


class GgufBackend(Backend):
    name = "gguf"
    BITS = LEVELS            # each level stands for a type (TYPE_OF_BITS, or the user's)
    GROUPED_BITS = ()        # no group size: each type has its own block

    def __init__(self, group_size: int = 64, types: str | tuple | None = None, levels=(2, 4)):
        # group_size is not used: every GGUF type has its own fixed block.
        super().__init__(group_size)
        levels = tuple(sorted(levels or (2, 4)))
        self.level_types = dict(zip(levels, parse_types(types, levels)))
        self.low, self.high = self.level_types[levels[0]], self.level_types[levels[-1]]
        self.ggml = ggml()
        self.imatrix: dict[tuple, np.ndarray] | None = None   # _key(linear) -> mean x^2 per input
        self.imatrix_stats: dict | None = None                # linear name -> core.imatrix.Stats

    @property
    def types(self) -> dict[int, str]:
        """level (bits) -> the llama.cpp type it stands for."""
        return self.level_types

    def type_for(self, bits: int, row_length: int) -> str:
        """The type stored for a weight at `bits` whose rows hold `row_length` weights."""
        return fallback_type(self.types[bits], row_length)

    def calibrate(self, loaded, windows: torch.Tensor, micro_batch: int = 8) -> None:
        """Collect the importance matrix on the calibration windows, with the model as it
        is now (unquantized): every later quantization of its linears uses it."""
        from core.imatrix import collect, imatrix_mean

        stats = collect(loaded, windows, micro_batch)
        self.imatrix = {_key(loaded.model.get_submodule(name)): imatrix_mean(s.sum2, s.count)
                        for name, s in stats.items()}
        self.imatrix_stats = stats

    def _check(self, shape: torch.Size, bits: int, what: str) -> None:
        # Not Backend's check: there is no group size, every type has its own block.
        if bits not in self.types:
            raise UserError(f"{bits}-bit is not a level of this gguf backend (for {what}): "
                            + ", ".join(f"{b} is {t}" for b, t in self.types.items()) + ".")
        row = shape[1]
        for (b1, t1), (b2, t2) in zip(list(self.types.items()), list(self.types.items())[1:]):
            s1, s2 = self.type_for(b1, row), self.type_for(b2, row)
            if tensor_nbytes(s1, 1, row) > tensor_nbytes(s2, 1, row):
                raise UserError(
                    f"{what} (shape {tuple(shape)}) would take more bytes at {t1} than at {t2}: its "
                    f"rows of {row} make llama.cpp store {s1} for {t1} and {s2} for {t2}. Choose "
                    "other `gguf_types`.")

    def _quantize_linear(self, linear: nn.Linear, bits: int) -> GgufLinear:
        weight = linear.weight
        type_name = self.type_for(bits, weight.shape[1])
        imatrix = None
        if self.imatrix is not None:
            imatrix = self.imatrix.get(_key(linear))
            if imatrix is None:
                raise RuntimeError("the gguf backend was calibrated on another model: no importance "
                                   f"matrix for a {tuple(weight.shape)} linear")
        elif type_name in NEEDS_IMATRIX:
            raise UserError(f"{type_name} needs an importance matrix (llama.cpp refuses to make it "
                            "without one), and none was collected for this model.")
        w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
        data = self.ggml.quantize(type_name, w, imatrix)
        back = self.ggml.dequantize(type_name, data, w.shape[1])
        dequantized = torch.from_numpy(back).to(device=weight.device, dtype=weight.dtype)
        return GgufLinear(type_name, data, dequantized, linear.bias)

    def _dequantize(self, module: GgufLinear) -> torch.Tensor:
        return module.weight.data

    def module_nbytes(self, module: GgufLinear) -> int:
        return int(module.data.nbytes)

    def fallbacks(self, shapes) -> dict[str, dict[str, str]]:
        """{name: {"Q2_K": "Q4_0", ...}} for the weights (name, (out, in)) that llama.cpp
        stores in another type than the one asked for."""
        found = {}
        for name, shape in shapes:
            swapped = {t: self.type_for(b, shape[1]) for b, t in self.types.items()
                       if self.type_for(b, shape[1]) != t}
            if swapped:
                found[name] = swapped
        return found

    def describe(self, shapes) -> dict:
        """What costs.json records for a gguf run: the pair, the fallbacks, the imatrix."""
        return {"low": self.low, "high": self.high, "llama_cpp_python": self.ggml.version,
                "by_level": {str(b): t for b, t in self.types.items()},
                "imatrix": self.imatrix is not None, "fallbacks": self.fallbacks(shapes)}


def _key(linear: nn.Module) -> tuple:
    """A linear's weight storage and shape: the same for a stand-in sharing its weight
    (core.backends.base.linear_holding)."""
    return linear.weight.data_ptr(), tuple(linear.weight.shape)
