"""optimum-quanto: weight-only qint2/qint4 with per-group float scale and shift (min-max);
qint8 with one scale per output row (quanto allows no groups at 8 bits)."""
from __future__ import annotations

import torch
from optimum.quanto import QLinear, qint2, qint4, qint8
from torch import nn

from core.backends import BITS_OF
from core.backends.base import Backend, tensor_nbytes
from core.backends.build_lock import build_folder, clear_stale_locks, redirect_builds, will_build

QTYPES = {2: qint2, 4: qint4, 8: qint8}


class QuantoBackend(Backend):
    name = "quanto"
    BITS = BITS_OF["quanto"]
    GROUPED_BITS = (2, 4)

    def __init__(self, group_size: int = 64):
        super().__init__(group_size)
        # quanto builds its C++ extension on first use, in its package folder (the user's
        # cache where that is read-only), under a lock that a killed build leaves behind:
        # clear it before any quanto module could wait on it forever.
        self.moved = redirect_builds()
        clear_stale_locks()

    def first_use(self, device: torch.device) -> str | None:
        """What quantizing on `device` will do first that takes long and shows nothing."""
        kind = {"cuda": "cuda", "mps": "mps"}.get(device.type, "cpp")
        if will_build(kind):
            where = (f" in {build_folder(kind)}, its own folder being read-only"
                     if f"quanto_{kind}" in self.moved else "")
            return (f"building optimum-quanto's {kind.upper() if kind != 'cpp' else 'C++'} kernels{where} "
                    "(once per install of quanto and torch; about 1.5 minutes on a GPU host)")
        return None

    def _quantize_linear(self, linear: nn.Linear, bits: int) -> QLinear:
        # No optimizer given: QLinear then uses its frozen-weight default for qint2/qint4,
        # MaxOptimizer (per-group min/max), like optimum.quanto.quantize() does.
        module = QLinear.from_module(linear, weights=QTYPES[bits])
        # QLinear picks its own group size from in_features (128, else 96, 64, 32);
        # set ours before freezing so every layer uses the configured one.
        if bits in self.GROUPED_BITS:
            module.weight_group_size = self.group_size
        module.freeze()
        return module

    def _dequantize(self, module: QLinear) -> torch.Tensor:
        return module.weight.dequantize()

    def module_nbytes(self, module: QLinear) -> int:
        # Packed data, scale and shift of the WeightQBitsTensor (or its tinygemm subclass).
        return tensor_nbytes(module.weight)
