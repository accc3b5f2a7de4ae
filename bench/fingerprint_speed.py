"""How long a run's fingerprint takes (core.fingerprint), against full sha256 of the same
weight files: what decides sampling over hashing every byte.

    python bench/fingerprint_speed.py [--model DIR] [--repeat 3]

Defaults to the embedded SmolLM2-135M-Instruct (its float32 safetensors, 538 MB). Both
are timed with the files in the page cache (after one untimed read), so the figures are
CPU cost; a cold disk adds its read time to the full hash only (sampling reads ~1 MB).
Writes bench/results/fingerprint_speed.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import fingerprint  # noqa: E402
from core.models import EMBEDDED, embedded_checkpoint  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    folder = embedded_checkpoint() if args.model == EMBEDDED else Path(args.model)
    weights = sorted(p for p in folder.iterdir() if p.name.endswith(fingerprint.WEIGHT_SUFFIXES))
    size = sum(p.stat().st_size for p in weights)

    def full() -> None:
        for p in weights:
            with open(p, "rb") as f:
                hashlib.file_digest(f, "sha256")

    def sampled() -> None:
        for p in weights:
            fingerprint.digest(p)

    def whole_part() -> None:
        fingerprint.model_part(str(folder))

    full()                                  # into the page cache, untimed
    t_full, t_sampled = best(full, args.repeat), best(sampled, args.repeat)
    t_part = best(whole_part, args.repeat)
    result = {
        "model": str(args.model), "weight_bytes": size, "files": [p.name for p in weights],
        "full_sha256_s": round(t_full, 4), "full_sha256_gb_per_s": round(size / t_full / 1e9, 3),
        "weights_sampled_s": round(t_sampled, 4),
        "model_part_s": round(t_part, 4),
        "full_sha256_8b_bf16_s_estimate": round(16e9 / (size / t_full), 1),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "note": "page cache warm; min of --repeat runs; weights_sampled: the weight files' "
                "digests (every tensor sampled); model_part: all the model's digests, the "
                "tokenizer's and config's JSON settings included (parsed and hashed whole)",
    }
    out = ROOT / "bench" / "results" / "fingerprint_speed.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
