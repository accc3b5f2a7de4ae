"""The importance matrix llama.cpp quantizes with: per linear, the mean square of each
input feature over the calibration tokens.

`collect` measures it on the unquantized model, as `llama-imatrix` does on its input
model: a hook on every decoder linear sums x^2 per input feature and counts the tokens.
`write` stores it in the GGUF imatrix format that current `llama-imatrix` writes and
`llama-quantize --imatrix` reads (common/imatrix-loader.cpp): general.type "imatrix",
imatrix.datasets / chunk_count / chunk_size, and per weight `<tensor>.in_sum2` (F32,
one row of sums) and `<tensor>.counts` (F32, the token count). llama.cpp divides one by
the other; `read` does the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GENERAL_TYPE = "general.type"
DATASETS, CHUNK_COUNT, CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class Stats:
    sum2: np.ndarray      # float64 [in_features]: sum over tokens of x^2
    count: int            # tokens seen

    @property
    def mean(self) -> np.ndarray:
        return (self.sum2 / max(1, self.count)).astype(np.float32)


def collect(loaded, windows: torch.Tensor, micro_batch: int = 8) -> dict[str, Stats]:
    """Stats of every decoder linear's input (by qualified name) over the windows [N, T]."""
    model = loaded.model
    names = [name for layer in loaded.linear_names for name in layer]
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook_for(name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + (x * x).sum(0) if name in sums else (x * x).sum(0)
            counts[name] += x.shape[0]
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.inference_mode():
            decoder = model.get_decoder()
            for batch in windows.to(loaded.device).split(max(1, micro_batch)):
                decoder(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {n: Stats(sum2=sums[n].cpu().numpy(), count=counts[n]) for n in names}


def write(path: Path, stats: dict[str, Stats], tensor_names: dict[str, str], *,
          dataset: str, chunks: int, chunk_tokens: int) -> None:
    """The GGUF imatrix file; tensor_names maps each linear to its GGUF tensor name
    (blk.N.attn_q.weight)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)   # llama-imatrix writes none
    writer.add_string(GENERAL_TYPE, "imatrix")
    writer.add_array(DATASETS, [dataset])
    writer.add_uint32(CHUNK_COUNT, chunks)
    writer.add_uint32(CHUNK_SIZE, chunk_tokens)
    for name in sorted(stats, key=lambda n: tensor_names[n]):
        s, tensor = stats[name], tensor_names[name]
        writer.add_tensor(tensor + SUMS, s.sum2.astype(np.float32).reshape(1, -1))
        writer.add_tensor(tensor + COUNTS, np.array([[float(s.count)]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean x^2 per input feature}, as llama-quantize loads it."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(SUMS):
            base = name.removesuffix(SUMS)
            count = float(tensors[base + COUNTS].reshape(-1)[0])
            out[base] = (sums.reshape(-1) / count) if count > 0 else np.ones(sums.size, np.float32)
    return out
