"""How long the gptq backend takes to prepare a run (a benchmark, not a test).

Builds a model of a real architecture's exact shape (core.models.SHAPES) with random
weights, then does what `run --backend gptq` does before its first SPQE sample:
calibrate (one forward pass recording each layer's inputs), and build every decoder
layer at every level through core.switching.LayerSwitch, which collects each layer's
Hessians (GPTQModel's GPTQ.add_batch on the unquantized layer's inputs) and quantizes
and packs each linear once per level (GPTQModel's GPTQ and TorchLinear). Times the
three parts, per layer and in total, and writes one JSON object.

    python bench/gptq_speed.py --shape llama-3.1-8b --out bench/results/gptq_speed_8b.json
    python bench/gptq_speed.py --shape smollm2-135m --layers 2 --device cpu --dtype float32 \
        --windows 2 --window-tokens 64 --out /tmp/gptq_speed.json      # smoke
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.backends import get_backend  # noqa: E402
from core.models import SHAPES, from_config, shape_config  # noqa: E402
from core.settings import DTYPES  # noqa: E402
from core.switching import LayerSwitch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="build only this many decoder layers (smoke runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--levels", type=int, nargs="+", default=[2, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=16, help="calibration windows (a GPU run's default)")
    p.add_argument("--window-tokens", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--real", action="store_true",
                   help="keep the packed modules (SPQE's packed memory plan) instead of de-quantized copies")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = shape_config(args.shape)
    if args.layers:
        config.num_hidden_layers = args.layers
    t = time.perf_counter()
    loaded = from_config(config, device, dtype)
    sync(device)
    build_s = time.perf_counter() - t
    L = len(loaded.layers)
    windows = torch.randint(0, config.vocab_size, (args.windows, args.window_tokens),
                            generator=torch.Generator().manual_seed(0))
    backend = get_backend("gptq", args.group_size)
    from gptqmodel.quantization.gptq_cuda import block_update_available

    fused = device.type == "cuda" and block_update_available()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    backend.calibrate(loaded, windows, args.micro_batch)
    sync(device)
    calibrate_s = time.perf_counter() - t

    # Time the two parts LayerSwitch interleaves: Hessian collection (once per layer) and
    # GPTQ + packing (once per linear and level), by wrapping the backend's own calls.
    timings = {"hessian": [0.0] * L, "quantize": {b: [0.0] * L for b in args.levels}}
    calibration = backend.calibration
    collect, quantize = calibration._collect, backend._quantize_linear

    def timed_collect(i: int) -> None:
        start = time.perf_counter()
        collect(i)
        sync(device)
        timings["hessian"][i] += time.perf_counter() - start

    def timed_quantize(linear, bits):
        start = time.perf_counter()
        module = quantize(linear, bits)
        sync(device)
        elapsed = time.perf_counter() - start
        i = calibration.index[(linear.weight.data_ptr(), tuple(linear.weight.shape))][0]
        timings["quantize"][bits][i] += elapsed
        return module

    calibration._collect, backend._quantize_linear = timed_collect, timed_quantize
    done = []

    def on_layer(i: int, total: int) -> None:
        done.append(time.perf_counter())
        print(f"layer {i}/{total}: Hessians {timings['hessian'][i - 1]:.2f} s, GPTQ + pack "
              + ", ".join(f"{b}-bit {timings['quantize'][b][i - 1]:.2f} s" for b in args.levels),
              flush=True)

    t = time.perf_counter()
    switch = LayerSwitch(loaded, backend, real=args.real, levels=[args.levels] * L, on_layer=on_layer)
    sync(device)
    layers_s = time.perf_counter() - t
    hessian_s = sum(timings["hessian"])
    quantize_s = {str(b): sum(v) for b, v in timings["quantize"].items()}
    costs = switch.costs()
    params = sum(costs.params)
    result = {
        "shape": args.shape, "layers": L, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": args.dtype, "levels": args.levels, "group_size": args.group_size,
        "calibration": {"windows": args.windows, "window_tokens": args.window_tokens,
                        "micro_batch": args.micro_batch, "tokens": args.windows * args.window_tokens},
        "real_modules": args.real,
        "gptq_fused_cuda_block_update": fused,
        "seconds": {"build_model": build_s, "calibrate_forward": calibrate_s,
                    "hessians": hessian_s, "gptq_and_pack": quantize_s,
                    "layerswitch_total": layers_s, "prepare_total": calibrate_s + layers_s},
        "per_layer_s": {"hessians": timings["hessian"],
                        "gptq_and_pack": {str(b): v for b, v in timings["quantize"].items()}},
        "decoder_weights": params,
        "bytes": {str(b): sum(costs.sizes[k]) for k, b in enumerate(costs.levels)}
        if hasattr(costs, "sizes") else {"lo": sum(costs.m_lo), "hi": sum(costs.m_hi)},
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "versions": {d: version(d) for d in ("torch", "transformers", "gptqmodel", "impq-tui")},
        "machine": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    s = result["seconds"]
    print(f"{args.shape} ({L} layers, {args.dtype}, {device}): calibrate {s['calibrate_forward']:.1f} s, "
          f"Hessians {hessian_s:.1f} s, GPTQ + pack "
          + ", ".join(f"{b}-bit {v:.1f} s" for b, v in quantize_s.items())
          + f"; total {s['prepare_total']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
