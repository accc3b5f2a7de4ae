"""Corpora (embedded, hub, local files) and the token windows cut from them."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from core.errors import UserError
from core.files import TEXT_FILE_LIMIT, read_bytes

TEXT_CHOICES = ("builtin", "wikitext2", "c4")
ROLES = ("calibration", "evaluation")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

TOPIC_SEPARATOR = "\n\n"
C4_CHARS = 3_000_000  # c4 streams: stop after this many characters (~700k tokens)
HUB_PROBE_TIMEOUT_S = 3.0

_ALTERNATIVES = (
    "Use `builtin` (the embedded English text, no network needed) or a local "
    ".txt, .jsonl (one {\"text\": ...} object per line) or .parquet (a `text` column) file."
)


def describe(spec: str) -> str:
    """A short human label for a text spec."""
    labels = {
        "builtin": "builtin (pydoc topics)",
        "wikitext2": "wikitext2 (wikitext-2-raw-v1)",
        "c4": "c4 (allenai/c4 en)",
    }
    return labels.get(spec, Path(spec).name)


def resolve_text(spec: str) -> str:
    """A text spec as a run records it: a local file's path made absolute (against the
    current folder), the named corpora as they are."""
    if spec in TEXT_CHOICES or not spec.strip():
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def load_text(spec: str, role: str) -> str:
    """The text for `role` ("calibration" or "evaluation") named by `spec`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if spec == "builtin":
        text = _builtin_halves()[ROLES.index(role)]
    elif spec == "wikitext2":
        text = _load_wikitext2(role)
    elif spec == "c4":
        text = _load_c4(role)
    elif not spec.strip():
        raise UserError(f"No text was named (an empty name). {_ALTERNATIVES}")
    else:
        # os.path.expanduser leaves an unknown ~user as it is (Path.expanduser raises)
        text = _load_local(Path(os.path.expanduser(spec)))
    if not text.strip():
        raise UserError(f"The text {describe(spec)!r} is empty or only whitespace. {_ALTERNATIVES}")
    return text


def _builtin_halves() -> tuple[str, str]:
    """The pydoc topics in sorted key order, split at the topic boundary nearest the middle."""
    from pydoc_data.topics import topics

    parts = [topics[key] for key in sorted(topics)]
    # Length of the joined text up to the end of part i (separators included).
    ends = np.cumsum([len(p) + len(TOPIC_SEPARATOR) for p in parts]) - len(TOPIC_SEPARATOR)
    k = 1 + int(np.argmin(np.abs(ends[:-1] - ends[-1] / 2)))
    return TOPIC_SEPARATOR.join(parts[:k]), TOPIC_SEPARATOR.join(parts[k:])


# --- hub corpora -------------------------------------------------------------------


def _hub_error(name: str, why: str) -> UserError:
    return UserError(f"Cannot load {name} from the Hugging Face hub: {why}. {_ALTERNATIVES}")


def _offline_mode() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _import_datasets(name: str):
    """The `datasets` module, after checking quickly that the hub can be used.

    In offline mode `datasets` reads only its cache, which fails at once when the
    dataset is not there; otherwise a short TCP probe stands in for its long retries.
    """
    try:
        import datasets
    except ImportError:
        raise _hub_error(name, "the optional package `datasets` is not installed "
                         "(pip install 'impq-tui[hub]')") from None
    if not _offline_mode():
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        except OSError as e:
            raise _hub_error(name, f"{host} cannot be reached ({e}); if the dataset is "
                             "cached, set HF_HUB_OFFLINE=1 to use the cached copy") from None
    return datasets


def _load_wikitext2(role: str) -> str:
    datasets = _import_datasets("wikitext2")
    split = "train" if role == "calibration" else "test"
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except OSError as e:  # ConnectionError, FileNotFoundError, HTTP errors
        raise _hub_error("wikitext2", str(e)) from None
    return "".join(rows["text"])  # each row keeps its own trailing newline


def _load_c4(role: str) -> str:
    datasets = _import_datasets("c4")
    files = {
        "calibration": "en/c4-train.00000-of-01024.json.gz",
        "evaluation": "en/c4-validation.00000-of-00008.json.gz",
    }
    texts, n_chars = [], 0
    try:
        rows = datasets.load_dataset("allenai/c4", data_files={"x": files[role]}, split="x",
                                     streaming=True)
        for row in rows:  # streaming reaches the network only while iterating
            texts.append(row["text"])
            n_chars += len(row["text"])
            if n_chars >= C4_CHARS:
                break
    except OSError as e:
        raise _hub_error("c4", str(e)) from None
    return TOPIC_SEPARATOR.join(texts)


# --- local files -------------------------------------------------------------------


def _shown(path: Path, limit: int = 160) -> str:
    """The path for a message, middle elided when it is very long."""
    text = str(path)
    return repr(text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}")


def _load_local(path: Path) -> str:
    try:
        exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
    except OSError as e:    # a name too long for the file system, a denied directory...
        raise UserError(f"Cannot use {_shown(path)} as a text file: {e.strerror or e}. Give an "
                        f"existing .txt, .jsonl or .parquet file, or one of "
                        f"{', '.join(TEXT_CHOICES)}.") from None
    if not exists:
        raise UserError(f"Text file {_shown(path)} does not exist. Give an existing .txt, .jsonl "
                        f"or .parquet file, or one of {', '.join(TEXT_CHOICES)}.")
    if is_dir:
        raise UserError(f"{_shown(path)} is a directory. Give a .txt, .jsonl or .parquet file.")
    if not is_file:         # a FIFO or a device: reading it could block or never end
        raise UserError(f"{_shown(path)} is not a regular file (a pipe or a device?). Give a "
                        ".txt, .jsonl or .parquet file.")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{path.name!r} has an unknown extension {suffix!r}. Give a .txt, .jsonl "
                        f"or .parquet file, or one of {', '.join(TEXT_CHOICES)}.")
    if suffix == ".parquet":
        if path.stat().st_size > TEXT_FILE_LIMIT:
            raise UserError(f"{_shown(path)} holds more than {TEXT_FILE_LIMIT:,} bytes: far more "
                            "text than a run uses. Give a smaller part of it.")
        return _read_parquet(path)
    text = _read_utf8(path)
    return _parse_jsonl(text, path.name) if suffix == ".jsonl" else text


def _read_utf8(path: Path) -> str:
    data = read_bytes(path, "text file", limit=TEXT_FILE_LIMIT)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path.name!r} is not UTF-8 text (bad byte at offset {e.start}). "
                        "Convert it to UTF-8, e.g. with iconv.") from None


def _parse_jsonl(text: str, name: str) -> str:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{name!r} line {number} is not a JSON object with a string "
                            "\"text\" field. Each line of a .jsonl file must look like "
                            "{\"text\": \"...\"}.")
        try:
            record["text"].encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise UserError(f"{name!r} line {number}: the \"text\" field is not valid Unicode "
                            "(it holds a lone surrogate escape).") from None
        texts.append(record["text"])
    return TOPIC_SEPARATOR.join(texts)


def _read_parquet(path: Path) -> str:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Reading .parquet files needs the package `pyarrow` (pip install "
                        "pyarrow). Or give a .txt or .jsonl file.") from None
    try:
        if "text" not in pq.read_schema(path).names:
            raise UserError(f"{path.name!r} has no `text` column. Give a parquet file with "
                            "a string column named `text`.")
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except UnicodeDecodeError as e:     # a string column whose bytes are not UTF-8
        raise UserError(f"The `text` column of {path.name!r} holds a value that is not UTF-8 "
                        f"(bad byte at offset {e.start} of that value); the file is damaged or "
                        "was written with another encoding.") from None
    except (pyarrow.ArrowException, OSError) as e:
        why = " ".join(str(e).split())     # pyarrow's messages run over several lines
        why = why if len(why) <= 200 else why[:200] + "..."
        raise UserError(f"{path.name!r} is not a readable parquet file ({why}).") from None
    if not all(v is None or isinstance(v, str) for v in values):
        raise UserError(f"The `text` column of {path.name!r} does not hold strings.")
    return TOPIC_SEPARATOR.join(v for v in values if v is not None)


# --- token windows -----------------------------------------------------------------


def token_windows(text: str, tokenizer, n_windows: int, window_tokens: int,
                  seed: int) -> torch.LongTensor:
    """N windows of T consecutive tokens, [N, T], sampled without replacement from the
    non-overlapping T-token chunks of `text`, in ascending position order."""
    N, T = n_windows, window_tokens
    if N < 1:
        raise UserError(f"The number of windows must be at least 1, not {N}.")
    if T < 2:
        raise UserError(f"A window must hold at least 2 tokens (one to predict from, one "
                        f"to predict), not {T}.")
    if not 0 <= seed < 2**63:    # numpy's generators refuse negative seeds with a bare ValueError
        raise UserError(f"The seed must lie between 0 and 2**63-1, not {seed}.")
    # verbose=False: the whole text is longer than the model's context on purpose.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_chunks = len(ids) // T
    if n_chunks == 0:
        raise UserError(f"The text has {len(ids)} tokens, fewer than the {T} one window "
                        "needs. Use a longer text or shorter windows.")
    if n_chunks < N:
        raise UserError(f"The text has {len(ids)} tokens: {n_chunks} windows of {T} tokens, "
                        f"fewer than the {N} asked for. Ask for at most {n_chunks} windows, "
                        "shorter windows, or a longer text.")
    chunks = torch.tensor(ids[: n_chunks * T], dtype=torch.long).view(n_chunks, T)
    chosen = np.sort(np.random.default_rng(seed).choice(n_chunks, size=N, replace=False))
    return chunks[torch.from_numpy(chosen)]


def eval_tokens(tokenizer, settings, calib_text: str | None = None,
                log=lambda message, level="info": None) -> torch.LongTensor:
    """The evaluation windows of core.settings.EvalSettings: the one token set eval,
    compare and export measure. A text shorter than the windows asked for gives all the
    windows it holds, with a note; one that overlaps the calibration text, a warning."""
    text = load_text(settings.text, "evaluation")
    T = settings.window_tokens
    available = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) // T
    windows = settings.windows
    if 0 < available < windows:
        log(f"the evaluation text holds {available} windows of {T} tokens; using all of them "
            f"(asked for {windows})")
        windows = available
    if settings.text == calib_text and settings.text not in TEXT_CHOICES:
        log(f"evaluation and calibration both read {settings.text}: the tokens may overlap, and "
            "perplexity then flatters every method. Evaluate on another text.", "warning")
    return token_windows(text, tokenizer, windows, T, settings.seed)
