"""How fast llama.cpp's quantizers (ggml through core.backends.gguf) quantize and decode
the weights SPQE's gguf backend prepares: millions of weights per second per type, on
the shapes of an 8B model's linears (rows of 4096 and 14336), with an importance matrix.
Preparing a gguf run quantizes every decoder linear once per type of the pair; this gives
its cost per billion weights. Writes OUT (JSON) and prints a table.

    python bench/gguf_quantize.py --out bench/results/gguf_quantize.json
    python bench/gguf_quantize.py --types Q2_K Q4_K --rows 1024 --out /tmp/q.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from core.backends.gguf import ggml, tensor_nbytes  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K", "Q4_K", "Q6_K", "IQ3_S", "IQ4_XS"])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096", "4096x14336"],
                   help="out x in of the weights (default: an 8B model's q/o, gate/up and down)")
    p.add_argument("--rows", type=int, help="quantize only this many rows of each shape (faster)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    lib = ggml()
    rng = np.random.default_rng(0)
    rows_out = []
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        rows = min(out_features, args.rows or out_features)
        W = rng.standard_normal((rows, in_features), dtype=np.float32) * 0.02
        importance = rng.random(in_features, dtype=np.float32) + 0.01
        for name in args.types:
            start = time.perf_counter()
            data = lib.quantize(name, W, importance)
            quantize_s = time.perf_counter() - start
            start = time.perf_counter()
            lib.dequantize(name, data, in_features)
            decode_s = time.perf_counter() - start
            assert data.nbytes == tensor_nbytes(name, rows, in_features)
            rows_out.append({"type": name, "shape": [rows, in_features], "weights": W.size,
                             "quantize_s": quantize_s, "decode_s": decode_s,
                             "mweights_per_s": W.size / quantize_s / 1e6,
                             "seconds_per_billion": quantize_s / W.size * 1e9})
            r = rows_out[-1]
            print(f"{name:7s} {rows:6d}x{in_features:<6d} quantize {quantize_s:7.2f} s "
                  f"({r['mweights_per_s']:7.2f} M weights/s, {r['seconds_per_billion']:7.0f} s per "
                  f"10^9), decode {decode_s:.3f} s")
    result = {"threads": lib.threads, "llama_cpp_python": lib.version, "machine": platform.node(),
              "processor": platform.processor(), "rows": rows_out}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
