"""HQQ: half-quadratic optimized zero points, per-group float scale and zero."""
from __future__ import annotations

import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
from torch import nn

from core.backends import BITS_OF
from core.backends.base import Backend, linear_holding, tensor_nbytes
from core.errors import UserError


class HqqBackend(Backend):
    name = "hqq"
    BITS = BITS_OF["hqq"]

    def __init__(self, group_size: int = 64):
        super().__init__(group_size)
        if group_size % 8 != 0:
            raise UserError(f"HQQ needs a group size that is a multiple of 8, not {group_size}; use e.g. 64.")
        # The pure-PyTorch forward is the one that runs on CPU and without the hqq_aten
        # extension. HQQ keeps the choice class-wide, so set it rather than trust the default.
        HQQLinear.set_backend(HQQBackend.PYTORCH)

    def _check(self, shape: torch.Size, bits: int, what: str) -> None:
        super()._check(shape, bits, what)
        # HQQ packs 8/bits rows of the [groups, group_size] matrix into one byte row and
        # silently corrupts the weight when the groups do not split evenly.
        groups = shape[0] * shape[1] // self.group_size
        if groups % (8 // bits) != 0:
            raise UserError(
                f"HQQ cannot pack {what} (shape {tuple(shape)}) at {bits} bits with group size "
                f"{self.group_size}: its {groups} groups are not a multiple of {8 // bits}; "
                "choose a smaller power-of-two group size."
            )

    def _quantize_linear(self, linear: nn.Linear, bits: int) -> HQQLinear:
        # quant_zero/quant_scale stay off (HQQ deprecated them): scale and zero are kept in
        # the compute dtype, the weight's own, so the module computes in the model's dtype.
        config = BaseQuantizeConfig(nbits=bits, group_size=self.group_size)
        # HQQLinear empties the linear it is given (del_orig), so give it a stand-in
        # and leave the caller's module intact.
        stand_in = linear_holding(linear.weight, linear.bias)
        weight = linear.weight
        return HQQLinear(stand_in, config, compute_dtype=weight.dtype, device=str(weight.device))

    def _dequantize(self, module: HQQLinear) -> torch.Tensor:
        return module.dequantize()

    def module_nbytes(self, module: HQQLinear) -> int:
        return tensor_nbytes(module.W_q) + _meta_nbytes(module.meta)


def _meta_nbytes(meta: dict) -> int:
    """Bytes of the tensors in HQQ's meta dict (scale, zero; nested dicts if meta is quantized)."""
    return sum(
        tensor_nbytes(value) if isinstance(value, torch.Tensor) else _meta_nbytes(value)
        for value in meta.values()
        if isinstance(value, (torch.Tensor, dict))
    )
