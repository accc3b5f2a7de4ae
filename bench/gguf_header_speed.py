"""How long deciding on a GGUF input takes (issue 14): the config impq-tui builds from the
header (core.models.gguf_config: transformers' fast header reader and its GGUF tables)
against transformers' own GGUF config reading (AutoConfig.from_pretrained(gguf_file=...),
which parses every vocabulary entry with gguf-py first; its tokenizer and weight loading
each do the same again).

    python bench/gguf_header_speed.py [--gguf FILE ...] [--repeat 3]

Without --gguf: header-only files (no tensors) with Llama 3's vocabulary size (128,256
tokens and 280,147 merges) and Gemma 3's (262,144 tokens with scores and types), and the
embedded SmolLM2's GGUF where installed. Writes bench/results/gguf_header_speed.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.models import _installed_embedded_gguf, gguf_config  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def header_only(path: Path, arch: str, tokens: int, merges: int = 0, spm: bool = False) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"header-only-{arch}")
    for key, value in {"context_length": 8192, "embedding_length": 2048, "block_count": 16,
                       "feed_forward_length": 8192, "attention.head_count": 32,
                       "attention.head_count_kv": 8, "attention.key_length": 64,
                       "attention.value_length": 64, "rope.freq_base": 500000.0,
                       "attention.layer_norm_rms_epsilon": 1e-5}.items():
        (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(f"{arch}.{key}", value)
    if arch == "gemma3":
        writer.add_sliding_window(512)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_token_list([f"tok{i}" for i in range(tokens)])
    writer.add_token_types([1] * tokens)
    if spm:
        writer.add_token_scores([float(-i) for i in range(tokens)])
    if merges:
        writer.add_token_merges([f"t{i} k{i}" for i in range(merges)])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    from transformers import AutoConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", nargs="*", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_header_speed.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.gguf:
            files = [Path(f) for f in args.gguf]
        else:
            files = [header_only(Path(tmp) / "llama3-vocab.gguf", "llama", 128256, merges=280147),
                     header_only(Path(tmp) / "gemma3-vocab.gguf", "gemma3", 262144, spm=True)]
            if _installed_embedded_gguf() is not None:
                files.append(_installed_embedded_gguf())
        gguf_config(files[0])             # imports, untimed
        rows = []
        for path in files:
            ours = best(lambda: gguf_config(path), args.repeat)
            theirs = best(lambda: AutoConfig.from_pretrained(path.parent, gguf_file=path.name), 1)
            rows.append({"file": path.name, "bytes": path.stat().st_size,
                         "impq_tui_gguf_config_s": round(ours, 4),
                         "transformers_autoconfig_s": round(theirs, 2)})
            print(f"{path.name}: impq-tui {ours:.3f} s, transformers {theirs:.1f} s", flush=True)
    result = {"what": "seconds to build the config of a GGUF file from its header",
              "host": platform.node(), "python": platform.python_version(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
