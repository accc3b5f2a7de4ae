"""The interface every PTQ backend offers the engine.

A backend turns one nn.Linear into the library's real quantized module and says how many
bytes that module stores (what the memory budget counts) and which weight it computes
with (what SPQE swaps in). core.switching.LayerSwitch builds every quantized model from
these modules, so the simulation cannot drift from the model that is evaluated or exported.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from core.errors import UserError

SUPPORTED_BITS = (2, 4)   # the paper's two precisions; each backend lists what it can do in BITS


@dataclass(frozen=True)
class QuantizedWeight:
    weight: torch.Tensor  # dequantized: same shape, dtype and device as the input weight
    nbytes: int           # packed integers + scales + zero points/shifts of the real module


class Backend(ABC):
    name: str
    BITS: tuple[int, ...] = SUPPORTED_BITS   # the precisions this library quantizes to (levels)
    GROUPED_BITS: tuple[int, ...] | None = None  # those that use the group size (None: all)

    def __init__(self, group_size: int = 64):
        if not isinstance(group_size, int) or group_size <= 0:
            raise UserError(f"Group size {group_size!r} is not a positive integer; use e.g. 64 or 128.")
        self.group_size = group_size

    def quantize_weight(self, weight: torch.Tensor, bits: int) -> QuantizedWeight:
        """Quantize one [out_features, in_features] weight exactly as quantize_linear does."""
        with torch.no_grad():
            module = self.quantize_linear(linear_holding(weight), bits)
            dequantized = self.dequantize(module)
        return QuantizedWeight(weight=dequantized, nbytes=self.module_nbytes(module))

    def quantize_linear(self, linear: nn.Linear, bits: int, name: str = "a weight") -> nn.Module:
        """The library's real quantized module for `linear` (left unchanged), on its device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        self._check(linear.weight.shape, bits, name)
        with torch.no_grad():
            return self._quantize_linear(linear, bits)

    def check(self, shape, bits: int, what: str) -> None:
        """Raise a UserError when a weight of `shape` cannot be quantized to `bits` here."""
        self._check(torch.Size(shape), bits, what)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight the real module computes with, in the original weight's dtype."""
        return self._dequantize(module)

    @abstractmethod
    def module_nbytes(self, module: nn.Module) -> int:
        """Bytes of the weight storage of one real quantized module (bias not included)."""

    @abstractmethod
    def _quantize_linear(self, linear: nn.Linear, bits: int) -> nn.Module:
        """The real quantized module for linear, on linear's device; linear is left unchanged."""

    @abstractmethod
    def _dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight the real module computes with, in the original weight's dtype."""

    def _check(self, shape: torch.Size, bits: int, what: str) -> None:
        if bits not in self.BITS:
            raise UserError(f"{bits}-bit is not supported by {self.name} (for {what}); choose among "
                            f"{', '.join(map(str, self.BITS))} bits.")
        if self.GROUPED_BITS is not None and bits not in self.GROUPED_BITS:
            return
        in_features = shape[1]
        if in_features % self.group_size != 0:
            raise UserError(
                f"Group size {self.group_size} does not divide the {in_features} input features of "
                f"{what} (shape {tuple(shape)}); choose a group size that divides it, e.g. 32 or 64."
            )


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements; for a quantized tensor subclass, of its inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        inner_names, _ = tensor.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(tensor, name)) for name in inner_names)
    return tensor.numel() * tensor.element_size()


def linear_holding(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear sharing weight and bias; built on meta so that it draws no random numbers."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear
