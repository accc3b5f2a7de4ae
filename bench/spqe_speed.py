"""SPQE speed against the hardware (a benchmark, not a test).

Builds a model of a real architecture's exact shape from its config with random weights
(speed does not depend on the weight values), measures the GPU's bf16 matrix-multiply
rate in the same run, then times
  fast:  the engine (each layer quantized once per precision and swapped by reference,
         hidden states cached at layer boundaries, chunked loss), and
  naive: a straightforward implementation (layers re-quantized by the backend at every
         step, the model's own full forward pass and loss for every evaluation; measured both
         re-quantizing every layer and only the changed one),
side by side, and writes one JSON object.

    python bench/spqe_speed.py --shape llama-3.1-8b --samples 3 --out speed.json
    python bench/spqe_speed.py --shape smollm2-135m --samples 5
    python bench/spqe_speed.py --shape llama-3.1-70b --engine --backend hqq --windows 8 \
        --window-tokens 1024 --micro-batch 2 --samples 2
    # as on a 40 GiB card: the layers that do not fit are streamed from host memory
    python bench/spqe_speed.py --shape llama-3.1-70b --gpu-memory 40 --backend hqq --windows 8 \
        --window-tokens 1024 --micro-batch 2 --samples 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.backends import get_backend  # noqa: E402
from core.models import SHAPES, from_config, shape_config  # noqa: E402
from core.spqe import Sampler, permutation  # noqa: E402
from core.switching import HIGH, LOW, LayerSwitch, PrefixEvaluator  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float | None:
    """The card's bf16 dense matrix-multiply rate, measured here (the ceiling for MFU)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()       # not to count against a --gpu-memory cap
    return 2 * n ** 3 / float(np.median(times)) / 1e12


def flops_per_layer(cfg, tokens: int, window: int) -> float:
    """Useful work of one decoder layer over all tokens: linears plus causal attention."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    linear_params = h * h * 2 + h * kv * 2 + 3 * h * i
    attention = 2 * window * h * tokens        # QK^T and PV, causal half: 2 * (2 T^2 h / 2) per window
    return 2 * linear_params * tokens + attention


def head_flops(cfg, tokens: int) -> float:
    return 2 * cfg.hidden_size * cfg.vocab_size * tokens


def bench_fast(loaded, windows, backend, samples: int, micro_batch: int, cfg, device,
               compile: bool = False, switch=None, quantize_s: float | None = None) -> dict:
    if switch is None:
        t0 = time.perf_counter()
        switch = LayerSwitch(loaded, backend)
        sync(device)
        quantize_s = time.perf_counter() - t0
    retries = []
    evaluator = PrefixEvaluator(loaded, windows, micro_batch, compile=compile,
                                layer_scope=switch.unpacked, on_retry=retries.append)
    streamed = getattr(switch, "streamed", None)
    layer_passes = []
    sampler = Sampler(switch, evaluator, seed=0,
                      on_eval=lambda step, steps, j: layer_passes.append(switch.L - j))
    sampler.start()
    sampler.sample(samples)        # warm-up sample (compilation, allocator), not timed
    sync(device)
    layer_passes.clear()
    copied = (streamed.copied_bytes, streamed.copies) if streamed else (0, 0)
    per_sample = []
    for m in range(samples):
        t = time.perf_counter()
        sampler.sample(m)
        sync(device)
        per_sample.append(time.perf_counter() - t)
    tokens, T = windows.numel(), windows.shape[1]
    useful = sum(p * flops_per_layer(cfg, tokens, T) + head_flops(cfg, tokens) for p in layer_passes)
    total = sum(per_sample)
    return {"quantize_both_precisions_s": quantize_s, "seconds_per_sample": float(np.mean(per_sample)),
            "per_sample_s": per_sample, "evals": len(layer_passes),
            "evals_per_s": len(layer_passes) / total, "useful_tflop": useful / 1e12,
            "useful_tflops_per_s": useful / total / 1e12,
            "mean_layers_per_eval": float(np.mean(layer_passes)),
            # the micro-batch halvings an out-of-memory error forced (the plan was too tight)
            "oom_retries": retries,
            "streamed_copies_per_sample": (streamed.copies - copied[1]) / samples if streamed else 0,
            "streamed_gib_per_sample": ((streamed.copied_bytes - copied[0]) / samples / 2**30
                                        if streamed else 0.0)}


def bench_naive(loaded, windows, backend, evals: int, micro_batch: int, cfg, device,
                all_layers: bool) -> dict:
    """The straightforward way: at each step re-quantize the layers with the backend (every
    layer for the new state when all_layers, else only the changed one), then run the
    model's own full forward pass and loss."""
    modules = dict(loaded.model.named_modules())
    linears = [[modules[n] for n in names] for names in loaded.linear_names]
    original = [[lin.weight for lin in layer] for layer in linears]

    def set_layer(i: int, bits: int) -> None:
        for lin, weight in zip(linears[i], original[i]):
            lin.weight = torch.nn.Parameter(backend.quantize_weight(weight.data, bits).weight,
                                            requires_grad=False)

    def full_loss() -> float:
        total = 0.0
        with torch.inference_mode():
            for batch in windows.split(micro_batch):
                total += loaded.model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
        return total / windows.shape[0]

    for i in range(len(linears)):
        set_layer(i, HIGH)
    full_loss()                                    # warm-up: kernels, allocator
    p = permutation(0, 0, len(linears))
    sync(device)
    t = time.perf_counter()
    low: set[int] = set()
    for k in range(evals):
        low.add(int(p[k % len(p)]))
        for i in (range(len(linears)) if all_layers else [int(p[k % len(p)])]):
            set_layer(i, LOW if i in low else HIGH)
        full_loss()
    sync(device)
    seconds = (time.perf_counter() - t) / evals
    for layer, weights in zip(linears, original):  # leave the model as it was
        for lin, weight in zip(layer, weights):
            lin.weight = weight
    tokens, T = windows.numel(), windows.shape[1]
    useful = len(linears) * flops_per_layer(cfg, tokens, T) + head_flops(cfg, tokens)
    return {"evals": evals, "seconds_per_eval": seconds, "evals_per_s": 1 / seconds,
            "seconds_per_sample": seconds * len(linears),
            "useful_tflops_per_s": useful / seconds / 1e12}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-tokens", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--samples", type=int, default=3, help="timed SPQE samples (fast path)")
    ap.add_argument("--naive-evals", type=int, default=4, help="timed evaluations (naive path)")
    ap.add_argument("--naive-all-evals", type=int, default=2,
                    help="timed evaluations of the naive path that re-quantizes every layer per step")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (fast path)")
    ap.add_argument("--backend", default="quanto")
    ap.add_argument("--engine", action="store_true",
                    help="build and quantize through the engine's memory plan (core.engine.prepare):"
                         " layer by layer and packed modules where the model does not fit")
    ap.add_argument("--gpu-memory", metavar="SIZE",
                    help="GPU memory cap as `impq-tui run --gpu-memory` takes it (40 = 40 GiB): the "
                         "plan streams what does not fit from host memory; implies --engine")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.gpu_memory:
        from core.engine import GPU_MEMORY_ENV, parse_memory

        parse_memory(args.gpu_memory)
        os.environ[GPU_MEMORY_ENV] = args.gpu_memory
        args.engine = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = shape_config(args.shape)
    peak_tflops = matmul_tflops(device)
    plan = switch = quantize_s = None
    t0 = time.perf_counter()
    if args.engine:
        # The engine's own path: the memory plan, then the model built (layer by layer where
        # it does not fit) and quantized as `impq-tui run` does.
        from core.engine import prepare
        from core.runs import RunConfig

        config = RunConfig(model=f"random:{args.shape}", backend=args.backend, group_size=64,
                           dtype="bfloat16" if device.type == "cuda" else "float32",
                           device=str(device), windows=args.windows,
                           window_tokens=args.window_tokens, micro_batch=args.micro_batch)
        logs = []
        prepared = prepare(config, lambda e: logs.append(getattr(e, "message", str(e))))
        sync(device)
        quantize_s = build_s = time.perf_counter() - t0
        loaded, windows, backend, switch = (prepared.loaded, prepared.windows.to(device),
                                            prepared.backend, prepared.switch)
        plan = [line for line in logs if line.startswith("memory plan")]
        args.naive_evals = args.naive_all_evals = 0
    else:
        loaded = from_config(cfg, device, dtype, name=args.shape)
        build_s = time.perf_counter() - t0
        windows = torch.randint(0, cfg.vocab_size, (args.windows, args.window_tokens),
                                generator=torch.Generator().manual_seed(0)).to(device)
        backend = get_backend(args.backend, 64)

    naive = bench_naive(loaded, windows, backend, args.naive_evals, args.micro_batch, cfg, device,
                        all_layers=False) if args.naive_evals > 0 else None
    naive_all = bench_naive(loaded, windows, backend, args.naive_all_evals, args.micro_batch, cfg,
                            device, all_layers=True) if args.naive_all_evals > 0 else None
    build_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gpu_after_build = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    fast = bench_fast(loaded, windows, backend, args.samples, args.micro_batch, cfg, device,
                      compile=args.compile, switch=switch, quantize_s=quantize_s)
    L = cfg.num_hidden_layers
    streamed = getattr(switch, "streamed", None)
    result = {
        "shape": args.shape, "layers": L, "backend": args.backend, "dtype": str(dtype),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "tokens_per_eval": args.windows * args.window_tokens,
        "windows": args.windows, "window_tokens": args.window_tokens, "micro_batch": args.micro_batch,
        "build_model_s": build_s,
        "engine_path": args.engine, "memory_plan": plan,
        "gpu_memory_cap": args.gpu_memory,
        "layers_streamed": len(streamed.layers) if streamed else 0,
        "layers_resident": L - (len(streamed.layers) if streamed else 0),
        "host_streamed_gib": streamed.host_bytes / 2**30 if streamed else 0.0,
        "host_pinned": streamed.pinned if streamed else None,
        "seconds_per_sample": fast["seconds_per_sample"],
        "gpu_mem_after_build_gib": gpu_after_build, "peak_gpu_mem_build_gib": build_peak,
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "matmul_bf16_tflops": peak_tflops,
        "compile": args.compile,
        "fast": fast,
        "naive_changed_layer": naive,
        "naive_all_layers": naive_all,
        "projected_100_samples_min": (fast["quantize_both_precisions_s"] + 100 * fast["seconds_per_sample"]) / 60,
        # the straightforward implementation re-quantizes the layers at each step
        "speedup_vs_naive": (naive_all["seconds_per_sample"] / fast["seconds_per_sample"]) if naive_all else None,
        "speedup_vs_naive_changed_layer": (naive["seconds_per_sample"] / fast["seconds_per_sample"]) if naive else None,
        "mfu": fast["useful_tflops_per_s"] / peak_tflops if peak_tflops else None,
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
        "gpu_mem_total_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
