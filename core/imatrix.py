"""The importance matrix llama.cpp quantizes with: per linear, the mean square of each
input feature over the calibration tokens.

`collect` measures it on the unquantized model, as `llama-imatrix` does on its input
model: a hook on every decoder linear sums x^2 per input feature and counts the tokens.
`write` stores it in the GGUF imatrix format that current `llama-imatrix` writes and
`llama-quantize --imatrix` reads (common/imatrix-loader.cpp): general.type "imatrix",
imatrix.datasets / chunk_count / chunk_size, and per weight `<tensor>.in_sum2` (F32,
one row of sums) and `<tensor>.counts` (F32, the token count). A mixture-of-experts
layer's experts are one stacked tensor in a GGUF (blk.N.ffn_up_exps): it gets one row of
sums and one count per expert, in expert order, as llama-imatrix writes a MUL_MAT_ID
weight's (the experts see different tokens). llama.cpp divides the sums by the count,
ones for a row that saw no token (an expert the calibration never routed to); `read`
does the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


GENERAL_TYPE = "general.type"
DATASETS, CHUNK_COUNT, CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"


def imatrix_mean(sum2: np.ndarray, count) -> np.ndarray:
    """Mean x^2 per input feature as llama.cpp takes it from an imatrix file: the float32
    sums divided by the float32 token count, ones where no token came (an expert the
    calibration never routed to). Computed so, not in float64: the imatrix the simulation
    quantizes with is then bit for bit the one the export's quantize reads back (a last-bit
    difference changes some blocks' bytes)."""
    sums = np.asarray(sum2, dtype=np.float32)
    count = np.asarray(count, dtype=np.float32)
    mean = sums / np.maximum(count, np.float32(1))
    return np.where(count > 0, mean, np.float32(1)).astype(np.float32)


@dataclass
class Stats:
    sum2: np.ndarray      # float64 [in_features]: sum over tokens of x^2
    count: int            # tokens seen (0: an expert no calibration token was routed to)

    @property
    def mean(self) -> np.ndarray:
        return imatrix_mean(self.sum2, self.count)


def collect(loaded, windows: torch.Tensor, micro_batch: int = 8) -> dict[str, Stats]:
    """Stats of every decoder linear's input (by qualified name) over the windows [N, T].
    Every linear has its stats, an expert that got no token zero sums and count 0."""
    model = loaded.model
    names = [name for layer in loaded.linear_names for name in layer]
    modules = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
            for name, m in modules.items()}
    counts = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        with torch.inference_mode():
            decoder = model.get_decoder()
            for batch in windows.to(loaded.device).split(max(1, micro_batch)):
                decoder(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {n: Stats(sum2=sums[n].cpu().numpy(), count=counts[n]) for n in names}


def write(path: Path, stats: dict[str, Stats], rows: dict[str, tuple[str, int]], *,
          dataset: str, chunks: int, chunk_tokens: int) -> None:
    """The GGUF imatrix file. `rows` maps each linear to its GGUF tensor and its row there:
    (blk.N.attn_q.weight, 0) for a dense weight, (blk.N.ffn_up_exps.weight, e) for expert e
    of a layer's stack, whose experts must all be in `stats`."""
    import gguf

    by_tensor: dict[str, dict[int, Stats]] = {}
    for name, s in stats.items():
        tensor, row = rows[name]
        by_tensor.setdefault(tensor, {})[row] = s
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)   # llama-imatrix writes none
    writer.add_string(GENERAL_TYPE, "imatrix")
    writer.add_array(DATASETS, [dataset])
    writer.add_uint32(CHUNK_COUNT, chunks)
    writer.add_uint32(CHUNK_SIZE, chunk_tokens)
    for tensor in sorted(by_tensor):
        measured = by_tensor[tensor]
        if sorted(measured) != list(range(len(measured))):
            raise RuntimeError(f"importance matrix of {tensor}: rows {sorted(measured)} measured")
        ordered = [measured[row] for row in range(len(measured))]
        writer.add_tensor(tensor + SUMS, np.stack([s.sum2 for s in ordered]).astype(np.float32))
        writer.add_tensor(tensor + COUNTS, np.array([[float(s.count)] for s in ordered], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean x^2 per input feature, a stack's experts one after the
    other}, as llama-quantize loads it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(SUMS):
            base = name.removesuffix(SUMS)
            counts = tensors[base + COUNTS].reshape(-1, 1)
            out[base] = imatrix_mean(sums.reshape(-1, sums.shape[-1]), counts).reshape(-1)
    return out
