"""What a run's numbers depend on beyond its config: the model's files, the calibration
tokens and the library versions, recorded in config.json so that a run is never
continued, evaluated or exported with something else.

    take(model, backend, windows)  the fingerprint of what a config names now
    model_part(model)              its model part alone (no loading; the hub cache for hub ids)
    check_model(config)            eval and export: refuse a model whose files changed
    differences(old, new, keys)    what changed, in words (then, now)

A weight file is digested by sha256 of its size, its header and samples of its
content, not of every byte: full sha256 reads 0.4 to 1.4 GB/s on 2 shared cores (11 to
37 s for an 8B model in bfloat16, minutes for 70B, on every resume, eval and export). In
a safetensors file every tensor is sampled (its first, middle and last 4 KiB), so a
checkpoint replaced by another one, or any retrained tensor, changes the digest; an
edit of a few weights between the samples does not. Other weight files (GGUF, .bin)
are sampled at 256 evenly spaced places after their first MiB. Files up to 16 MiB are
hashed whole; JSON settings (config.json, tokenizer files) as their canonical content
without the keys that only record how they were saved. bench/fingerprint_speed.py
measures it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
from pathlib import Path

FORMAT = 1
CHUNK = 4096
WHOLE_LIMIT = 16 << 20            # files up to this size are hashed whole
HEADER_LIMIT = 100 << 20          # a safetensors header larger than this is not one
STRIDES = 256                     # samples of a weight file that is not safetensors
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
CONFIG_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "sentencepiece.bpe.model")
# Keys of a JSON config that record how or by what it was saved, not what it computes
# (the embedded model converted again offline writes "local_files_only": true).
VOLATILE_KEYS = {"local_files_only", "_commit_hash", "_name_or_path", "name_or_path",
                 "transformers_version", "cache_dir"}
BACKEND_LIBRARIES = {"quanto": "optimum-quanto", "hqq": "hqq", "gptq": "gptqmodel",
                     "gguf": "llama-cpp-python"}

# The parts of a fingerprint, in the words a message uses.
PARTS = {"weights": "weights", "model_config": "model config", "tokenizer": "tokenizer",
         "calibration": "calibration tokens", "versions": "library versions"}
MODEL_PARTS = ("weights", "model_config", "tokenizer")


def model_location(model: str) -> Path | None:
    """The folder or .gguf file holding `model` on this machine: the embedded model's
    cache folder, a local path, or a hub id's snapshot in the Hugging Face cache. None
    for random:<shape> models and hub models not downloaded yet."""
    from core.models import EMBEDDED, RANDOM_PREFIX, embedded_checkpoint

    model = model or EMBEDDED
    if model.startswith(RANDOM_PREFIX):
        return None
    if model == EMBEDDED:
        return embedded_checkpoint()
    local = Path(os.path.expanduser(model))
    if local.exists():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except (ValueError, OSError, ImportError):   # not a repo id (HFValidationError), no cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_part(model: str) -> dict | None:
    """The path and digests of the model's files; None where nothing local names it."""
    from core.errors import UserError
    from core.files import why

    location = model_location(model)
    if location is None:
        return None
    try:
        return _model_part(location)
    except OSError as exc:
        raise UserError(f"cannot read the model's files in {location}: {why(exc)}"
                        f"{f' ({exc.filename})' if exc.filename else ''}.") from None


def check_model(config) -> None:
    """Eval and export: the model's files (weights, config, tokenizer) are those the run
    measured, where the run recorded them (runs made before that pass unchecked). The
    calibration text and library versions do not change the model they quantize."""
    from core.errors import UserError

    stored = config.fingerprint if comparable(config.fingerprint) else None
    part = model_part(config.model) if stored else None
    changes = differences(stored, part, MODEL_PARTS) if part else []
    if changes:
        raise UserError(f"the model {config.model} is not the one the run measured: "
                        f"{'; '.join(changes)}. Its allocation would be applied to other "
                        "weights: nothing was written. Put back the model the run was made "
                        "with, or start a new run on this one.")


def unchecked(config) -> str | None:
    """What eval, export and compare say about a run they cannot check (made before
    fingerprints, or by an impq-tui that took them in another way)."""
    if comparable(config.fingerprint):
        return None
    return (f"this run does not record its model's files in a form this impq-tui reads: it "
            f"cannot be checked that {config.model} is the model the run measured. Continuing "
            "the run (`resume`) records it.")


def _model_part(location: Path) -> dict:
    if location.is_file():
        return {"path": str(location.absolute()),
                "weights": {location.name: digest(location)}, "model_config": {}, "tokenizer": {}}
    files = sorted(p for p in location.iterdir() if p.is_file())
    return {"path": str(location.absolute()),
            # a .gguf beside a checkpoint (a llama.cpp conversion) is not what transformers loads
            "weights": {p.name: digest(p) for p in files
                        if p.name.endswith(WEIGHT_SUFFIXES) and not p.name.endswith(".gguf")},
            "model_config": {p.name: digest(p) for p in files if p.name in CONFIG_FILES},
            "tokenizer": {p.name: digest(p) for p in files if p.name in TOKENIZER_FILES}}


def versions(backend: str) -> dict:
    names = ["torch", "transformers", BACKEND_LIBRARIES.get(backend, backend), "impq-tui"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def calibration(windows) -> str:
    """sha256 of the calibration token ids (int64, row-major) and their shape."""
    import torch

    ids = windows.to(torch.int64).contiguous().cpu().numpy()
    h = hashlib.sha256(json.dumps(list(ids.shape)).encode())
    h.update(ids.tobytes())
    return f"{ids.shape[0]}x{ids.shape[1]} sha256 {h.hexdigest()[:32]}"


def check_calibration(config, windows) -> None:
    """Refuse when these calibration windows are not the ones the run measured (an export
    that calibrates, as gguf's importance matrix does, on the run's text)."""
    stored = config.fingerprint
    if not comparable(stored) or "calibration" not in stored:
        return
    now = calibration(windows)
    if now != stored["calibration"]:
        from core.errors import UserError

        raise UserError(f"the calibration text {config.calib_text} gives other tokens than the run "
                        f"measured with ({_shown(stored['calibration'])} then, {_shown(now)} now): "
                        "the importance matrix would not be the one SPQE used. Put back the "
                        "run's calibration text.")


def take(model: str, backend: str, windows=None, part: dict | None = None) -> dict:
    """The whole fingerprint (`part`: the model part, when taken already)."""
    part = part if part is not None else model_part(model)
    record = {"format": FORMAT, "versions": versions(backend)}
    if part is not None:
        record.update(part)
    if windows is not None:
        record["calibration"] = calibration(windows)
    return record


def comparable(stored: dict | None) -> bool:
    """Whether a recorded fingerprint can be compared with one taken now: it exists and was
    taken the same way (a later impq-tui may digest files otherwise)."""
    return isinstance(stored, dict) and stored.get("format") == FORMAT


def differences(old: dict, new: dict, keys=tuple(PARTS)) -> list[str]:
    """Each part in `keys` that both fingerprints hold and that differs, as
    "weights: model.safetensors 858,280 bytes sha256 1a2b... then, ... now"."""
    found = []
    for key in keys:
        if key not in old or key not in new or old[key] == new[key]:
            continue
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            names = sorted(set(a) | set(b))
            changes = [f"{name} {_shown(a.get(name))} then, {_shown(b.get(name))} now"
                       for name in names if a.get(name) != b.get(name)]
            found.append(f"{PARTS[key]}: {'; '.join(changes[:4])}"
                         + (f" (and {len(changes) - 4} more files)" if len(changes) > 4 else ""))
        else:
            found.append(f"{PARTS[key]}: {a} then, {b} now")
    return found


def _shown(value) -> str:
    return "absent" if value is None else str(value)


# ---------------------------------------------------------------- one file's digest

def digest(path: Path) -> str:
    """"<size> bytes sha256 <hex>" of the whole file when small, else of samples; a JSON
    object's settings (config.json, tokenizer files) canonically, without VOLATILE_KEYS."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        h = hashlib.sha256(str(size).encode())
        settings = _json_settings(fd, size) if path.name.endswith(".json") else None
        if settings is not None:
            h = hashlib.sha256(settings)
            kind = "settings sha256"
        elif size <= WHOLE_LIMIT:
            _update(h, fd, [(0, size)])
            kind = "sha256"
        else:
            _update(h, fd, _safetensors_samples(fd, size) or _strided_samples(size))
            kind = "sampled sha256"
    finally:
        os.close(fd)
    if settings is not None:        # the same settings saved twice may differ in bytes
        return f"{kind} {h.hexdigest()[:32]}"
    return f"{size:,} bytes {kind} {h.hexdigest()[:32]}"


def _json_settings(fd: int, size: int) -> bytes | None:
    """A JSON object's settings, canonical (sorted keys) and without VOLATILE_KEYS; None
    for anything else (then the bytes are hashed)."""
    if size > WHOLE_LIMIT:
        return None
    try:
        data = json.loads(os.pread(fd, size, 0))
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    kept = {k: v for k, v in data.items() if k not in VOLATILE_KEYS}
    return json.dumps(kept, sort_keys=True).encode()


def _update(h, fd: int, ranges) -> None:
    for start, length in ranges:
        while length > 0:
            data = os.pread(fd, min(length, 1 << 20), start)
            if not data:
                break
            h.update(data)
            start, length = start + len(data), length - len(data)


def _safetensors_samples(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The header, then the first, middle and last CHUNK of every tensor's bytes; None
    when the file is not a safetensors file."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= min(HEADER_LIMIT, size - 8):
        return None
    try:
        header = json.loads(os.pread(fd, n, 8))
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    ranges = [(0, 8 + n)]
    base = 8 + n
    for key in sorted(header):
        offsets = header[key].get("data_offsets") if isinstance(header[key], dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            continue
        begin, end = base + offsets[0], base + offsets[1]
        middle = (begin + end) // 2
        for start in sorted({begin, max(begin, middle - CHUNK // 2), max(begin, end - CHUNK)}):
            ranges.append((start, min(CHUNK, end - start)))
    return ranges


def _strided_samples(size: int) -> list[tuple[int, int]]:
    head = min(size, 1 << 20)
    rest = size - head
    if rest <= 0:
        return [(0, head)]
    step = max(rest // STRIDES, 1)
    starts = sorted({min(head + i * step, size - CHUNK) for i in range(STRIDES)} | {size - CHUNK})
    return [(0, head)] + [(s, min(CHUNK, size - s)) for s in starts if s >= head]
