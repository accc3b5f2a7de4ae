#!/usr/bin/env bash
# Multi-GPU SPQE against one GPU, through the real CLI, on a model of Llama-3.1-8B's shape
# with random weights: throughput of each, and whether the vectors are the same.
#   bash bench/multi_gpu.sh [GPUS] [OUT_JSON]
set -euo pipefail
gpus=${1:-2}; out=${2:-multi_gpu.json}; work=$(mktemp -d)
model=${MODEL:-random:llama-3.1-8b}
python3 -m impq_tui run --model "$model" --device cuda --samples 4 --gpus 1 --run-dir "$work/g1" --quiet
python3 -m impq_tui run --model "$model" --device cuda --samples $((4 * gpus)) --gpus "$gpus" --run-dir "$work/gN" --quiet
python3 - "$work" "$gpus" "$out" <<'PY'
import json, sys
import numpy as np
from core.runs import RunDir
work, gpus, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def rate(path, per_round):
    t = sorted(r["t"] for r in RunDir(path).samples())
    ends = t[per_round - 1::per_round]                         # when each round was written
    return per_round * (len(ends) - 1) / (ends[-1] - ends[0])  # samples/s after the first round
one, many = RunDir(f"{work}/g1"), RunDir(f"{work}/gN")
D1, DN = one.D(), many.D()
result = {"gpus": gpus, "model": one.config.model, "tokens_per_eval": one.config.windows * one.config.window_tokens,
          "samples_per_s_1gpu": rate(f"{work}/g1", 1), f"samples_per_s_{gpus}gpu": rate(f"{work}/gN", gpus),
          "max_abs_diff_same_samples": float(np.abs(D1 - DN[:len(D1)]).max()),
          "identical_vectors": bool((D1 == DN[:len(D1)]).all())}
result["speedup"] = result[f"samples_per_s_{gpus}gpu"] / result["samples_per_s_1gpu"]
print(json.dumps(result, indent=1)); open(out, "w").write(json.dumps(result, indent=1) + "\n")
PY
