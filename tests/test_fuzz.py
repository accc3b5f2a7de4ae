"""Input fuzzing with hypothesis (issue 7, reliability).

The text loaders take binary garbage, invalid UTF-8, BOMs, NUL bytes, empty and huge
lines and damaged parquet files; the command line takes odd budgets, odd numbers and odd
flags. Every input gets a result or a clear error -- a UserError that names the file, or
a one-line message and a non-zero exit -- never a traceback, never a hang, and bad input
destroys no earlier work (the fixture run's samples, config and costs stay byte for byte).

No fuzz case loads a model: transformers' from_pretrained (and the random and embedded
model builders) are replaced by a tripwire. What may be asked is core's to say
(core.requests): for each command line the CLI's own parser and the request's
validate() tell whether it is refused, and a refused one must be refused before the
tripwire, naming the field's flag. validate() itself is tested directly at the end.

IMPQ_FUZZ_SCALE multiplies the example counts; IMPQ_FUZZ_COUNTS names a JSON file that
receives how many inputs were tried (bench/fuzz_counts.py uses both).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from core.data import load_text, token_windows
from core.errors import InvalidField, UserError
from core.requests import (
    MAX_BUDGET_BYTES,
    MAX_SAMPLES,
    CompareRequest,
    EvalRequest,
    ExportRequest,
    RunRequest,
    SolveRequest,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "run-tiny8"
PROTECTED = ("samples.jsonl", "config.json", "costs.json")
SCALE = float(os.environ.get("IMPQ_FUZZ_SCALE", "1"))
COUNTS = {"text_loader_inputs": 0, "cli_argv_inputs": 0}
HANG_S = 120          # one input on a loaded 2-core machine takes well under a second


def examples(n: int) -> int:
    return max(1, round(n * SCALE))


FUZZ = dict(deadline=None, database=None, derandomize=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.large_base_example, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    target = os.environ.get("IMPQ_FUZZ_COUNTS")
    if target:
        Path(target).write_text(json.dumps(COUNTS))


class Hang(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of waiting forever) when one input takes longer than `seconds`."""
    def on_alarm(_signum, _frame):
        raise Hang(f"no answer within {seconds} s")

    # pytest-timeout (timeout = 600 in pyproject) may have its own SIGALRM running: keep it.
    outer, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 0.001))


# =================================================================== text loaders

SPECIAL_BYTES = [b"\n", b"\r\n", b"\r", b"   ", b"\t", b"\x00", b"\x00\x00\x00", b"\xef\xbb\xbf",
                 b"\xff\xfe", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                 b"\xc0\xaf", b"\x85", b"\x80", "\u2028".encode(), "\u0085".encode(),
                 "\u00a0".encode(), "\ufeff".encode(), b"\x1a", b"\x0b\x0c"]

json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)
ODD_JSON_LINES = ['{"text": "\\ud800"}', '{"text": "a\\udfffb"}', '{"text": "a\\u0000b"}',
                  '{"text":', '[' * 5000 + ']' * 5000, '{"a":' * 3000 + '1' + '}' * 3000,
                  '{"text": "x"} trailing', '{"text": 1e999}', 'NaN', '{"text": "ok", "text": 5}',
                  "1" * 5000, '\ufeff{"text": "bom"}', '{"TEXT": "upper"}', '{"text": ["a"]}',
                  '{"text": null}', '{"text": ""}', '{"text": "  \\n "}', "{'text': 'single'}",
                  '{"text": "tab\there"}', '"just a string"', "{}", "[]"]
jsonl_lines = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=40)),
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False), st.text(max_size=40)),
    st.builds(lambda v: json.dumps({"text": v}), json_values),
    st.builds(json.dumps, st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    json_values.map(json.dumps),
    st.sampled_from(ODD_JSON_LINES),
).map(lambda s: (s + "\n").encode("utf-8", "surrogatepass"))

byte_chunks = st.one_of(
    st.binary(max_size=64),                         # garbage
    st.text(max_size=40).map(str.encode),           # ordinary text, any script
    st.sampled_from(SPECIAL_BYTES),
    jsonl_lines,
)
file_bytes = st.one_of(
    st.lists(byte_chunks, max_size=24).map(b"".join),
    st.lists(jsonl_lines, min_size=1, max_size=12).map(b"".join),
    st.lists(st.sampled_from([b"\n", b"\r\n", b" \n", b"\t\n", b"\xef\xbb\xbf"]),
             max_size=50).map(b"".join),            # empty lines only
    st.binary(min_size=0, max_size=4096),
)


@st.composite
def parquet_files(draw) -> tuple[bytes, str | None]:
    """(bytes of a parquet file, the text a correct reader returns or None when an error
    is the right answer or the answer is not predicted)."""
    name = draw(st.sampled_from(["text", "text", "text", "Text", "body", "text ", ""]))
    kind = draw(st.sampled_from(["string", "string", "large_string", "dictionary", "int", "float",
                                 "binary", "bool", "list", "struct", "null", "mixed-null"]))
    strings = draw(st.lists(st.none() | st.text(max_size=30), max_size=8))
    n = len(strings)
    arrays = {
        "string": lambda: pa.array(strings, pa.string()),
        "large_string": lambda: pa.array(strings, pa.large_string()),
        "dictionary": lambda: pa.array(strings, pa.string()).dictionary_encode(),
        "int": lambda: pa.array(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n)),
                                pa.int64()),
        "float": lambda: pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), pa.float64()),
        "binary": lambda: pa.array([None if s is None else s.encode() for s in strings], pa.binary()),
        "bool": lambda: pa.array([s is None for s in strings], pa.bool_()),
        "list": lambda: pa.array([[s] for s in strings], pa.list_(pa.string())),
        "struct": lambda: pa.array([{"text": s} for s in strings],
                                   pa.struct([("text", pa.string())])),
        "null": lambda: pa.nulls(n),
        "mixed-null": lambda: pa.array([None] * n, pa.string()),
    }
    columns = {name: arrays[kind]()}
    if draw(st.booleans()):
        columns["other" if name != "other" else "x"] = pa.array(range(n), pa.int32())
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), buf, compression=draw(st.sampled_from(["snappy", "none", "zstd"])))
    raw = buf.getvalue().to_pybytes()
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "prefix"]))
    if damage == "truncate":
        raw = raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    elif damage == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    elif damage == "prefix":
        raw = draw(st.binary(min_size=1, max_size=16)) + raw
    expected = None
    if damage == "none" and name == "text" and kind in ("string", "large_string", "dictionary"):
        joined = "\n\n".join(s for s in strings if s is not None)
        expected = joined if joined.strip() else None
    return raw, expected


def load_or_user_error(path: Path) -> str | None:
    """The text, or None after checking that the error is a clear UserError naming the file."""
    COUNTS["text_loader_inputs"] += 1
    try:
        with time_limit(HANG_S):
            text = load_text(str(path), "calibration")
    except UserError as exc:
        message = str(exc)
        note(f"UserError: {message}")
        assert path.name in message, message
        assert "\n" not in message and len(message) < 1000, message
        return None
    assert isinstance(text, str) and text.strip()
    text.encode("utf-8")       # valid Unicode: no lone surrogates reach the tokenizer
    return text


def windows_or_user_error(tokenizer, text: str, n: int, t: int, seed: int) -> None:
    try:
        with time_limit(HANG_S):
            w = token_windows(text, tokenizer, n, t, seed)
    except UserError as exc:
        assert "\n" not in str(exc)
        ok_args = n >= 1 and t >= 2 and 0 <= seed < 2**63
        if ok_args and len(text) < 100_000:   # then only a short text is a reason to refuse
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            assert len(ids) // t < n, (len(ids), n, t, str(exc))
        return
    assert tuple(w.shape) == (n, t) and w.dtype == torch.long
    assert int(w.min()) >= 0 and int(w.max()) < len(tokenizer)


window_counts = st.integers(-3, 40) | st.sampled_from([10**6, 2**31])
window_tokens = st.integers(-3, 300) | st.sampled_from([2, 10**6, 10**12])
seeds = st.integers(-5, 2**64)


@settings(max_examples=examples(80), **FUZZ)
@given(suffix=st.sampled_from([".txt", ".jsonl", ".parquet", ".TXT", ".JsonL"]), data=file_bytes,
       n=window_counts, t=window_tokens, seed=seeds)
def test_text_files_of_any_bytes(tiny_tokenizer, suffix, data, n, t, seed):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"corpus{suffix}"
        path.write_bytes(data)
        text = load_or_user_error(path)
    if suffix.lower() == ".txt":
        try:
            decoded = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            assert text is None
        else:
            assert text == (decoded if decoded.strip() else None)
    if text is not None:
        windows_or_user_error(tiny_tokenizer, text, n, t, seed)


@settings(max_examples=examples(60), **FUZZ)
@given(parquet=parquet_files(), n=window_counts, t=window_tokens, seed=seeds)
def test_parquet_files_of_any_shape(tiny_tokenizer, parquet, n, t, seed):
    raw, expected = parquet
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "corpus.parquet"
        path.write_bytes(raw)
        text = load_or_user_error(path)
    if expected is not None:
        assert text == expected
    if text is not None:
        windows_or_user_error(tiny_tokenizer, text, n, t, seed)


@settings(max_examples=examples(5), **FUZZ)
@given(fmt=st.sampled_from(["txt", "jsonl", "parquet", "txt-bad-end", "jsonl-unclosed"]),
       size=st.integers(1_000_000, 3_000_000),
       unit=st.sampled_from(["a", "ab ", "é", "\x00", "😀 ", "x\ty", "\u2028"]))
def test_one_huge_line(tiny_tokenizer, fmt, size, unit):
    """Megabytes in one line (no newline to split at): read in seconds, cut into windows."""
    line = unit * (size // len(unit.encode()))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"huge.{fmt.split('-')[0]}"
        if fmt == "parquet":
            pq.write_table(pa.table({"text": [line]}), path)
        elif fmt.startswith("jsonl"):
            body = json.dumps({"text": line})
            path.write_text(body[:-2] if fmt == "jsonl-unclosed" else body + "\n")
        else:
            path.write_bytes(line.encode() + (b"\xff" if fmt == "txt-bad-end" else b""))
        text = load_or_user_error(path)
    if fmt in ("txt-bad-end", "jsonl-unclosed") or not line.strip():
        assert text is None
        return
    assert text == line
    windows_or_user_error(tiny_tokenizer, text, 4, 64, 0)


@settings(max_examples=examples(40), **FUZZ)
@given(spec=st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", ".", "..", "~", "/", "/dev/null", "/dev/zero", "/dev/zero.txt",
                     "/proc/self/status", "builtin ", "BUILTIN", "wikitext2\n", "x\x00.txt",
                     "a" * 300 + ".txt", "/" + "b/" * 3000 + "c.txt", "~nobody-here/x.txt"]),
    st.text(max_size=12).map(lambda s: s + st_suffix(s)),
))
def test_any_text_name(spec):
    """Whatever name is given (odd, too long, a directory, a device), a text or a UserError."""
    COUNTS["text_loader_inputs"] += 1
    try:
        with time_limit(HANG_S):
            text = load_text(spec, "evaluation")
    except UserError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 1000, str(exc)
        return
    assert isinstance(text, str) and text.strip()


def st_suffix(s: str) -> str:
    return (".txt", ".jsonl", ".parquet")[len(s) % 3]


def test_fifo_and_device_are_refused_not_read(tmp_path):
    """A pipe named like a text file would block the reader forever."""
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    for path in (fifo, link):
        with time_limit(30), pytest.raises(UserError, match="not a regular file"):
            load_text(str(path), "calibration")


# =================================================================== command line

class ModelLoadReached(BaseException):
    """The tripwire: a fuzz case got as far as loading model weights."""


@pytest.fixture(scope="module")
def no_model_loading():
    import transformers

    import core.models

    def tripwire(original):
        def guarded(*args, **kwargs):
            if kwargs.get("gguf_file"):        # fuzz .gguf files are garbage: they fail fast
                return original(*args, **kwargs)
            raise ModelLoadReached(f"{args} {kwargs}")
        return guarded

    def refuse(*args, **kwargs):
        raise ModelLoadReached(f"{args} {kwargs}")

    with pytest.MonkeyPatch.context() as mp:
        for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
            mp.setattr(cls, "from_pretrained", tripwire(cls.from_pretrained))
        mp.setattr(core.models, "from_config", refuse)
        mp.setattr(core.models, "embedded_checkpoint", refuse)
        yield


def _note(text: str) -> None:
    """hypothesis.note inside a hypothesis test (shown with a failing example)."""
    if currently_in_test_context():
        note(text)


@dataclass
class Outcome:
    code: int | None
    out: str
    err: str
    reached_model: bool = False

    @property
    def summary(self) -> str:
        return "model reached" if self.reached_model else f"exit {self.code}"


def invoke(argv: list[str], cwd: Path) -> Outcome:
    """impq_tui.cli.main in this process: exit code, stdout, stderr. Any exception other
    than argparse's SystemExit and the tripwire fails the test with its traceback."""
    from impq_tui import cli

    COUNTS["cli_argv_inputs"] += 1
    _note(f"argv: {argv!r}")
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {s: signal.getsignal(s) for s in signals}
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    reached = False
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(HANG_S):
            try:
                code = cli.main(argv)
            except SystemExit as exc:          # argparse: usage and one error line, exit 2
                code = exc.code
            except ModelLoadReached:
                code, reached = None, True
    finally:
        os.chdir(here)
        for s, handler in saved.items():
            signal.signal(s, handler)
    result = Outcome(code, out.getvalue(), err.getvalue(), reached)
    _note(f"exit {code}; stderr: {result.err[-600:]!r}")
    assert "Traceback" not in result.out + result.err
    return result


ERROR_LINE = re.compile(r"^impq-tui(?: \w+)?: error: (.+)$")


def assert_clear_error(outcome: Outcome, naming: str | None = None) -> None:
    """A non-zero exit whose last stderr line is the one error line (naming `naming`)."""
    assert outcome.code not in (0, None), (outcome.code, outcome.err)
    lines = [ln for ln in outcome.err.split("\n") if ln.strip()]
    assert lines, "no message on stderr"
    match = ERROR_LINE.match(lines[-1])
    assert match, lines[-1]
    message = match.group(1)
    assert len(message) < 1200, message
    if naming is not None:
        assert naming in message, (naming, message)


def refusal(argv: list[str], cwd: Path) -> str | None:
    """What the command line's own parser and core's request say of argv, as the CLI
    must report it: "usage" when argparse refuses it, the flag of the field that the
    request's validate() names, None when the request is valid (the run, the model or
    the disk may still refuse it)."""
    from impq_tui.cli import SUB_COMMANDS, build_parser
    from impq_tui.cli.args import FLAGS

    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:
                return "usage"
            try:
                SUB_COMMANDS[args.command].request(args).validate()
            except InvalidField as exc:
                return FLAGS[exc.field]
    finally:
        os.chdir(here)
    return None


def check_outcome(argv: list[str], cwd: Path) -> Outcome:
    """The properties every command line has: no traceback (invoke), exit 0, the model
    reached, or one clear error line; and what the parser or validate() refuses is
    refused before any model is loaded, with the field's flag in the message."""
    refused = refusal(argv, cwd)
    outcome = invoke(argv, cwd)
    event(f"{argv[0]}: {'refused' if refused else 'valid request'} -> {outcome.summary}")
    if refused is not None:
        assert not outcome.reached_model, f"refused ({refused}) but got as far as loading weights"
        assert_clear_error(outcome, None if refused == "usage" else refused)
    elif outcome.code != 0 and not outcome.reached_model:
        assert_clear_error(outcome)
    return outcome


# ------------------------------------------------------------------- parts of argv

NEG_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")   # argparse takes these as values, not flags

ODD_NUMBERS = ["2", "2.0", "4", "4.0", "3", "2.5", "2.0000001", "3.9999999", "4.0000001",
               "1.9999999", "2,5", "", " ", "0x10", "1e308", "-1", "-0", "-0.0", "nan", "NaN",
               "inf", "-inf", "Infinity", "2.5abc", "٢.٥", "2_5", "+3", " 3 ", "3\n", "1e-320",
               "0", "0.5", "1", "1.0000000001", "1" * 5000, "9" * 400, "\x00", "3\x00", "2.5e0",
               "１", "64", "128", "7", "-5", "-.5", "1e3", "10", "200000", "110592", "110591",
               str(2**63), str(2**63 - 1), str(10**18), str(10**19), "1_000_000"]
numbers = st.one_of(
    st.sampled_from(ODD_NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(1.5, 4.5).map(lambda x: f"{x:.7f}"),
    st.integers(-10**20, 10**20).map(str),
    st.integers(-3, 300).map(str),
    st.text(max_size=6),
).filter(lambda v: not v.lstrip("-").startswith("h"))   # -h / --h... is help: exit 0
small_ints = st.integers(-2, 64).map(str)


@st.composite
def option(draw, name: str, values=numbers) -> list[str]:
    """`--name value` or `--name=value`."""
    value = draw(values)
    return [f"{name}={value}"] if draw(st.booleans()) else [name, value]


def flag(name: str):
    return st.just([name])


ODD_TOKENS = [["--bogus"], ["-x"], ["extra"], ["--BITS"], ["—bits"], ["-"], ["--json=1"],
              ["--alpha"], ["--quiet=yes"], ["--"], ["\x00"], ["--bits-x", "3"]]


def odd_tokens():
    """A token no sub-command takes: unknown flags, a stray word, a flag with no value."""
    return st.sampled_from(ODD_TOKENS)


@st.composite
def some_of(draw, strategies) -> list[list[str]]:
    chosen = draw(st.lists(st.sampled_from(range(len(strategies))), unique=True,
                           max_size=len(strategies)))
    return [draw(strategies[i]) for i in chosen]


def flatten(parts) -> list[str]:
    return [t for p in parts for t in p]


# ------------------------------------------------------------------- shared scratch

class Scratch:
    """Files for the command lines; `run` is a copy of the fixture run (commands may write
    into it), `pristine` its protected files' bytes."""

    def __init__(self, root: Path, run: Path):
        self.root, self.run = root, run
        self.pristine: dict = {}
        self.counter = 0

    def __repr__(self) -> str:
        return f"Scratch({str(self.root)!r})"

    def fresh(self, stem: str) -> Path:
        self.counter += 1
        return self.root / "fresh" / f"{stem}-{self.counter}"

    def protected(self) -> dict:
        return {name: (self.run / name).read_bytes() for name in PROTECTED}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, no_model_loading) -> Scratch:
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("run.lock"))
    (root / "fresh").mkdir()
    (root / "cwd").mkdir()
    (root / "ok.txt").write_text("plenty of ordinary words " * 200)
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.jsonl").write_bytes(b"\n\n  \n")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "bad.jsonl").write_bytes(b'{"text": 5}\n')
    (root / "garbage.parquet").write_bytes(os.urandom(300))
    (root / "plain-file").write_text("not a directory")
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("earlier work")
    (root / "m.gguf").write_bytes(os.urandom(4096))
    (root / "badcfg").mkdir()
    (root / "badcfg" / "config.json").write_text("not json {")
    (root / "nomodel").mkdir()
    (root / "nomodel" / "config.json").write_text('{"model_type": "bert"}')
    s = Scratch(root=root, run=run)
    s.pristine = s.protected()
    assert s.pristine == {name: (FIXTURE / name).read_bytes() for name in PROTECTED}
    return s


def cwd_of(s: Scratch) -> Path:
    return s.root / "cwd"


def device_part():
    return st.sampled_from(["cpu", "", "auto", "cuda", "cuda:0", "gpu", "cpu:0", "cuda:x", "mps",
                            "CUDA", "cuda:-1"]).map(lambda d: ["--device", d])


def text_part(s: Scratch, name: str):
    r = s.root
    return st.sampled_from([
        "builtin", str(r / "ok.txt"), "wikitext2", "c4", str(r / "missing.txt"),
        str(r / "empty.txt"), str(r / "blank.jsonl"), str(r / "latin1.txt"), str(r / "bad.jsonl"),
        str(r / "garbage.parquet"), str(r / "nonempty"), "notes.docx", "", "/dev/zero",
        "a" * 300 + ".txt"]).map(lambda t: [name, t])


plausible_bits = st.one_of(
    st.floats(1.9, 4.1).map(lambda x: f"{x:.{int(x * 1000) % 9}f}"),
    st.sampled_from(["2", "4", "2.0000001", "3.9999999", "4.0000001", "1.9999999", "2.5",
                     "+3", " 3 ", "3e0", "٣", "3_0", "1e308", "nan", "-inf", "inf"]))
plausible_budgets = st.one_of(
    st.integers(100_000, 250_000).map(str),
    st.sampled_from(["110592", "110591", "184320", "184321", str(10**18), str(10**18 + 1),
                     "9" * 400, "1" * 5000, str(2**64), "1_000_000", "0", "-1"]))
plausible_alphas = st.one_of(
    st.floats(-0.1, 1.1).map(repr),
    st.sampled_from(["0", "1", "0.0", "1.0", "nan", "1e-320", "-0.0", "1.0000001", "inf"]))


def budget_parts():
    """--bits / --budget-bytes: half the time exactly one of them, else 0-2 of each."""
    bits = option("--bits")
    budget = option("--budget-bytes", numbers | st.integers(100_000, 300_000).map(str)
                    | st.sampled_from(["9" * 400, str(10**30), str(2**64), str(10**18 + 1)]))
    return st.one_of(bits.map(lambda p: [p]), budget.map(lambda p: [p]),
                     st.builds(lambda b, m: b + m, st.lists(bits, max_size=2),
                               st.lists(budget, max_size=2)))


def plausible_budget():
    return option("--bits", plausible_bits) | option("--budget-bytes", plausible_budgets)


def alpha_parts(values=numbers):
    return st.lists(option("--alpha", values), max_size=2)


def eval_window_parts(values=numbers):
    return [option("--eval-windows", values), option("--eval-window-tokens", values)]


def backend_part():
    return st.sampled_from(["quanto", "hqq", "gptq", "nope", ""]).map(lambda b: ["--backend", b])


def run_dir_arg(s: Scratch):
    return st.sampled_from([str(s.run)] * 5 + [str(s.root / "plain-file"), str(s.root / "nonempty"),
                                              str(s.root / "missing-run"), ""]).map(lambda d: [d])


def protected_unchanged(s: Scratch, before: dict) -> None:
    assert s.protected() == before == s.pristine


# ------------------------------------------------------------------- solve

@settings(max_examples=examples(70), **FUZZ)
@given(data=st.data())
def test_solve_with_odd_budgets_and_flags(scratch, data):
    s = scratch
    if data.draw(st.booleans()):     # near the edges of what is valid
        parts = [data.draw(plausible_budget())]
        parts += data.draw(st.lists(option("--alpha", plausible_alphas), max_size=1))
        parts += data.draw(st.lists(flag("--json"), max_size=1))
    else:                            # anything
        parts = data.draw(budget_parts()) + data.draw(alpha_parts())
        parts += data.draw(st.lists(flag("--json"), max_size=2))
        parts += data.draw(st.lists(odd_tokens(), max_size=1))
    argv = ["solve", str(s.run), *flatten(data.draw(st.permutations(parts)))]
    before = s.protected()
    outcome = check_outcome(argv, cwd_of(s))
    assert not outcome.reached_model
    if outcome.code == 0 and "--json" in argv:
        record = json.loads(outcome.out.strip().split("\n")[-1])
        assert len(record["bits_per_layer"]) == 8 and record["bytes"] <= record["budget_bytes"]
    protected_unchanged(s, before)


# ------------------------------------------------------------------- run (new runs)

def model_part(s: Scratch):
    """A model that cannot load: a `run` with it must fail, whatever else it holds."""
    r = s.root
    return st.sampled_from([
        "/nonexistent-impq-fuzz/model", str(r / "missing-model"), "random:bogus", "random:",
        str(r / "m.gguf"), str(r / "badcfg"), str(r / "nomodel"), str(r / "nonempty"),
        "~/no-such-impq-model", "./not-here.gguf", str(r / "ok.txt")]).map(lambda m: ["--model", m])


def run_dir_part(s: Scratch):
    def make(kind):
        if kind == "fresh":
            return str(s.fresh("run"))
        if kind == "empty-dir":
            path = s.fresh("emptydir")
            path.mkdir(parents=True)
            return str(path)
        return {"file": str(s.root / "plain-file"), "nonempty": str(s.root / "nonempty"),
                "under-file": str(s.root / "plain-file" / "run"),
                "too-long": str(s.root / ("n" * 300)), "empty": "", "fixture": str(s.run)}[kind]

    return st.sampled_from(["fresh", "fresh", "empty-dir", "file", "nonempty", "under-file",
                            "too-long", "empty", "fixture"]).map(lambda k: ["--run-dir", make(k)])


def run_option_parts(s: Scratch):
    """Options of `run` other than --model/--run-dir/--resume, each 0 or 1 times."""
    return [text_part(s, "--calib-text"),
            st.sampled_from(["quanto", "hqq", "gptq", "QUANTO", ""]).map(lambda b: ["--backend", b]),
            *(option(name) for name in ("--group-size", "--samples", "--windows", "--window-tokens",
                                        "--seed", "--micro-batch", "--gpus")),
            device_part(), flag("--antithetic"), flag("--compile"), flag("--quiet")]


@settings(max_examples=examples(60), **FUZZ)
@given(data=st.data())
def test_run_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    parts = [data.draw(model_part(s))]          # always invalid: no case starts real work
    parts += data.draw(some_of(run_option_parts(s)))
    if data.draw(st.booleans()):
        parts.append(data.draw(run_dir_part(s)))
    parts += data.draw(st.lists(odd_tokens(), max_size=1))
    parts = data.draw(st.permutations(parts))
    argv = ["run", *flatten(parts)]
    run_dirs = [p[1] for p in parts if p[0] == "--run-dir"]
    existed = {d: os.path.exists(d) for d in run_dirs if d}
    outcome = check_outcome(argv, cwd_of(s))
    assert not outcome.reached_model, "a `run` with a model that cannot load got as far as loading weights"
    assert_clear_error(outcome)
    for d, was in existed.items():       # nothing half-made is left behind
        if not was:
            assert not os.path.exists(d), f"{d} was left behind"
    assert (s.root / "nonempty" / "keep.txt").read_text() == "earlier work"
    assert not list((cwd_of(s)).glob("runs/*")), "a default run directory was left behind"


# ------------------------------------------------------------------- run --resume

IDENTITY_SAME = {"--model": "/tmp/impq-tui-tiny8", "--calib-text": "builtin", "--backend": "quanto",
                 "--group-size": "64", "--windows": "4", "--window-tokens": "32", "--seed": "0"}
IDENTITY_OTHER = {"--model": ["/tmp/impq-tui-tiny8/", "/nonexistent/model"], "--calib-text": ["c4"],
                  "--backend": ["hqq", "nope"], "--group-size": ["32", "0", "x"],
                  "--windows": ["8", "-4"], "--window-tokens": ["64", "1"],
                  "--seed": ["1", "-1", str(2**64)]}


@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_resume_never_damages_the_run(scratch, data):
    s = scratch
    if data.draw(st.booleans()):    # only what a resume may change: valid, or nearly
        parts = data.draw(some_of([
            option("--samples", st.integers(0, 30).map(str)),
            option("--micro-batch", st.integers(0, 16).map(str)),
            option("--gpus", st.integers(1, 3).map(str)),
            st.sampled_from([["--device", "cpu"], ["--device", ""]]),
            flag("--compile"), flag("--quiet"),
            *[st.just([k, v]) for k, v in IDENTITY_SAME.items()]]))
    else:
        parts = data.draw(some_of([
            *[st.sampled_from([v, *IDENTITY_OTHER[k]]).map(lambda v, k=k: [k, v])
              for k, v in IDENTITY_SAME.items()],
            flag("--antithetic"), option("--samples", numbers | st.integers(1, 20).map(str)),
            option("--micro-batch"), option("--gpus"), device_part(), flag("--compile"),
            flag("--quiet"), run_dir_part(s)]))
        parts += data.draw(st.lists(odd_tokens(), max_size=1))
    parts = data.draw(st.permutations(parts))
    target = data.draw(st.sampled_from(["run"] * 6 + ["file", "missing", "empty"]))
    resume = {"run": str(s.run), "file": str(s.root / "plain-file"),
              "missing": str(s.root / "no-such-run"), "empty": ""}[target]
    argv = ["run", "--resume", resume, *flatten(parts)]
    before = s.protected()
    outcome = check_outcome(argv, cwd_of(s))
    if target != "run":
        assert_clear_error(outcome)
    after = s.protected()
    assert after["samples.jsonl"] == before["samples.jsonl"] == s.pristine["samples.jsonl"]
    assert after["costs.json"] == before["costs.json"] == s.pristine["costs.json"]
    if outcome.code != 0:
        assert after["config.json"] == before["config.json"], "a failed resume changed config.json"
    else:
        # a successful resume may record a new --samples/--micro-batch/--compile; never
        # what decides the vectors
        old, new = json.loads(before["config.json"]), json.loads(after["config.json"])
        assert new["config_hash"] == old["config_hash"]
        (s.run / "config.json").write_bytes(s.pristine["config.json"])
    assert s.protected() == s.pristine


# ------------------------------------------------------------------- eval, compare, export

@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_eval_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    if data.draw(st.booleans()):     # near the edges of what is valid
        run_dir, parts = [str(s.run)], [data.draw(plausible_budget())]
        parts += data.draw(st.lists(option("--alpha", plausible_alphas), max_size=1))
        windows = eval_window_parts(small_ints)
    else:                            # anything
        run_dir, parts = data.draw(run_dir_arg(s)), data.draw(budget_parts())
        parts += data.draw(alpha_parts()) + data.draw(st.lists(odd_tokens(), max_size=1))
        windows = eval_window_parts()
    parts += data.draw(some_of([text_part(s, "--eval-text"), *windows, backend_part(),
                                device_part(), flag("--json")]))
    argv = ["eval", *run_dir, *flatten(data.draw(st.permutations(parts)))]
    before = s.protected()
    check_outcome(argv, cwd_of(s))
    protected_unchanged(s, before)


@settings(max_examples=examples(40), **FUZZ)
@given(data=st.data())
def test_compare_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    parts = []
    if data.draw(st.booleans()):
        parts.append(["--bits", *data.draw(st.lists(numbers, max_size=4))])
    parts += data.draw(alpha_parts())
    parts += data.draw(some_of([text_part(s, "--eval-text"), *eval_window_parts(), backend_part(),
                                device_part(), flag("--json"), flag("--quiet")]))
    parts += data.draw(st.lists(odd_tokens(), max_size=1))
    argv = ["compare", *data.draw(run_dir_arg(s)), *flatten(data.draw(st.permutations(parts)))]
    before = s.protected()
    check_outcome(argv, cwd_of(s))
    protected_unchanged(s, before)


OUT_KINDS = ["fresh", "fresh", "fresh", "empty-dir", "file", "nonempty", "no-parent", "run",
             "in-run", "empty", "dot", "dotdot", "cwd-abs", "root", "home", "no-user"]


def out_part(s: Scratch, kinds=OUT_KINDS):
    def make(kind):
        if kind == "fresh":
            return str(s.fresh("export"))
        if kind == "empty-dir":
            path = s.fresh("emptyout")
            path.mkdir(parents=True)
            return str(path)
        return {"file": str(s.root / "plain-file"), "nonempty": str(s.root / "nonempty"),
                "no-parent": str(s.root / "missing-parent" / "out"), "run": str(s.run),
                "in-run": str(s.run / "exports" / "x"), "empty": "", "dot": ".", "dotdot": "..",
                "cwd-abs": str(cwd_of(s)), "root": "/", "home": "~",
                "no-user": "~no-such-user-impq/out"}[kind]
    return st.sampled_from(kinds).map(lambda k: ["--out", make(k)])


@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_export_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    if data.draw(st.booleans()):     # near the edges of what is valid
        run_dir = [str(s.run)]
        parts = [data.draw(option("--bits", plausible_bits)),
                 data.draw(out_part(s, ["fresh", "fresh", "empty-dir", "nonempty"]))]
        parts += data.draw(st.lists(option("--alpha", plausible_alphas), max_size=1))
        windows = eval_window_parts(small_ints)
    else:                            # anything
        run_dir = data.draw(run_dir_arg(s))
        parts = data.draw(st.lists(option("--bits"), max_size=2))
        parts += data.draw(st.lists(out_part(s), max_size=1)) + data.draw(alpha_parts())
        parts += data.draw(st.lists(odd_tokens(), max_size=1))
        windows = eval_window_parts()
    parts += data.draw(some_of([*windows, backend_part(), device_part(), flag("--json"),
                                flag("--force"), flag("--eval"), flag("--verify"),
                                text_part(s, "--eval-text")]))
    argv = ["export", *run_dir, *flatten(data.draw(st.permutations(parts)))]
    before = s.protected()
    check_outcome(argv, cwd_of(s))
    protected_unchanged(s, before)
    assert (s.root / "nonempty" / "keep.txt").read_text() == "earlier work"
    assert (cwd_of(s)).is_dir()
    partial = [p for p in s.root.rglob(".*partial*")]
    assert not partial, f"half-written export left behind: {partial}"


# ------------------------------------------------------------------- the requests' validate()

def _ok_text(tmp_path: Path) -> str:
    path = tmp_path / "ok.txt"
    path.write_text("plenty of ordinary words " * 200)
    return str(path)


VALID = {RunRequest: RunRequest(), SolveRequest: SolveRequest(run_dir="run", bits=3.0),
         EvalRequest: EvalRequest(run_dir="run", bits=3.0),
         CompareRequest: CompareRequest(run_dir="run", bits=(2.5, 3.0)),
         ExportRequest: ExportRequest(run_dir="run", bits=3.0, out="exports/x")}
MISSING, EMPTY, OK = object(), object(), object()     # text files made in tmp_path

# (request, field, values validate() refuses naming that field, values it accepts)
FIELD_CASES = [
    (RunRequest, "samples", [0, -1, MAX_SAMPLES + 1, 10**30], [1, MAX_SAMPLES]),
    (RunRequest, "group_size", [0, -64], [1, 64]),
    (RunRequest, "windows", [0, -1], [1, 10**6]),
    (RunRequest, "window_tokens", [1, 0, -5], [2, 2048]),
    (RunRequest, "seed", [-1, 2**63, 2**64], [0, 2**63 - 1]),
    (RunRequest, "micro_batch", [0], [1, 16]),
    (RunRequest, "gpus", [0, 4096], [1]),
    (RunRequest, "run_dir", ["", "  ", "\t"], ["runs/x", "."]),
    (RunRequest, "resume", ["", " "], ["runs/x"]),
    (RunRequest, "calib_text", [MISSING, EMPTY], ["builtin", "c4", OK]),
    (SolveRequest, "bits", [1.99, 8.01, -3.0, math.nan, math.inf, -math.inf], [2.0, 2.5, 4.0, 6.0]),
    (SolveRequest, "alpha", [-0.1, 1.01, math.nan, math.inf], [0.0, 0.5, 1.0]),
    (EvalRequest, "bits", [8.5], [2.25]),
    (EvalRequest, "alpha", [2.0], [1.0]),
    (EvalRequest, "eval_windows", [0, -3], [1, 64]),
    (EvalRequest, "eval_window_tokens", [1, 0], [2, 4096]),
    (EvalRequest, "eval_text", [MISSING, EMPTY], ["builtin", "wikitext2", OK]),
    (CompareRequest, "bits", [(), (3.0, 9.0), (math.nan,), (1.0, 2.0)], [(2.0,), (2.25, 4.0)]),
    (CompareRequest, "alpha", [-1.0], [0.0]),
    (CompareRequest, "eval_window_tokens", [1], [2]),
    (CompareRequest, "eval_text", [MISSING], [OK]),
    (ExportRequest, "bits", [8.5, math.nan], [2.0, 4.0]),
    (ExportRequest, "alpha", [1.5], [0.25]),
    (ExportRequest, "out", ["", " ", ".", "..", "/", "~", "~no-such-user-impq/x"],
     ["exports/x", "~/exports/x", "x"]),
    (ExportRequest, "eval_windows", [0], [1]),
    (ExportRequest, "eval_window_tokens", [1], [2]),
]


def _value(v, tmp_path: Path):
    if v is MISSING:
        return str(tmp_path / "missing.txt")
    if v is EMPTY:
        (tmp_path / "empty.txt").write_text("  \n")
        return str(tmp_path / "empty.txt")
    return _ok_text(tmp_path) if v is OK else v


@pytest.mark.parametrize("request_type, field, bad, good", FIELD_CASES,
                         ids=[f"{c[0].__name__}.{c[1]}" for c in FIELD_CASES])
def test_validate_names_the_field(tmp_path, monkeypatch, request_type, field, bad, good):
    """Each refused value is refused naming its field by core's name, in one line that
    names no command-line flag; each accepted value passes."""
    monkeypatch.chdir(tmp_path)            # `out` is checked against the working directory
    base = VALID[request_type]
    for value in bad:
        with pytest.raises(InvalidField) as info:
            replace(base, **{field: _value(value, tmp_path)}).validate()
        message = str(info.value)
        assert info.value.field == field and message.startswith(f"{field} "), message
        assert "--" not in message and "\n" not in message and len(message) < 1000, message
        assert info.value.named("Label") == f"Label {info.value.problem}"
    for value in good:
        replace(base, **{field: _value(value, tmp_path)}).validate()


def test_valid_requests_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for request in VALID.values():
        request.validate()
    text = _ok_text(tmp_path)
    RunRequest(model="m", calib_text=text, backend="hqq", group_size=32, samples=200, windows=16,
               window_tokens=2048, seed=7, antithetic=True, device="cpu", micro_batch=4,
               compile=True, run_dir="runs/x").validate()
    SolveRequest(run_dir="run", budget_bytes=150_000_000, alpha=0.0, method="impq-local").validate()
    ExportRequest(run_dir="run", bits=2.5, out="e", evaluate=True, verify=True, eval_text=text,
                  eval_windows=4, eval_window_tokens=64).validate()
    # the text is read only when the export is evaluated
    ExportRequest(run_dir="run", bits=2.5, out="e", eval_text=str(tmp_path / "missing.txt")).validate()


def test_validate_refuses_combinations():
    with pytest.raises(InvalidField) as info:
        RunRequest(run_dir="runs/new", resume="runs/old").validate()
    assert info.value.field == "resume" and "not both" in str(info.value)
    for bits, budget in ((3.0, 150_000_000), (None, None)):
        with pytest.raises(InvalidField) as info:
            SolveRequest(run_dir="run", bits=bits, budget_bytes=budget).validate()
        assert info.value.field == "bits"
    with pytest.raises(InvalidField) as info:
        SolveRequest(run_dir="run", budget_bytes=MAX_BUDGET_BYTES + 1).validate()
    assert info.value.field == "budget_bytes"


@settings(max_examples=examples(100), **FUZZ)
@given(data=st.data())
def test_validate_blames_the_field_at_fault(data):
    """Any mix of odd values: validate() passes, or names a field whose own value is at
    fault (putting back a valid value there clears that complaint)."""
    request_type = data.draw(st.sampled_from(sorted(VALID, key=lambda t: t.__name__)))
    base = VALID[request_type]
    odd = {"int": st.integers(-3, 3) | st.sampled_from([2**63, 2**64, 10**19, MAX_SAMPLES + 1]),
           "float": st.floats(allow_nan=True, allow_infinity=True),
           "str": st.sampled_from(["", " ", ".", "~", "runs/x", "builtin", "/nonexistent/x.txt"])}
    numeric = {"samples", "group_size", "windows", "window_tokens", "seed", "micro_batch",
               "eval_windows", "eval_window_tokens", "budget_bytes"}
    changes = {}
    for f in fields(request_type):
        if f.name == "gpus" or not data.draw(st.booleans()):
            continue
        if f.name in numeric:
            changes[f.name] = data.draw(odd["int"])
        elif f.name in ("bits", "alpha"):
            x = data.draw(odd["float"])
            changes[f.name] = (x,) if request_type is CompareRequest and f.name == "bits" else x
        elif f.name in ("run_dir", "resume", "out", "calib_text", "eval_text"):
            changes[f.name] = data.draw(odd["str"])
    if request_type in (SolveRequest, EvalRequest) and "budget_bytes" in changes:
        changes["bits"] = None                 # exactly one budget (both: test above)
    if "resume" in changes:
        changes["run_dir"] = None              # one or the other (both: test above)
    request = replace(base, **changes)
    try:
        request.validate()
    except InvalidField as exc:
        assert exc.field in changes, (exc.field, changes)
        assert "--" not in str(exc) and "\n" not in str(exc)
        fixed = replace(request, **{exc.field: getattr(base, exc.field)})
        if exc.field == "budget_bytes":
            fixed = replace(request, budget_bytes=None, bits=3.0)
        try:
            fixed.validate()
        except InvalidField as again:
            assert again.field != exc.field, (exc, again)


def test_every_field_has_a_flag():
    """The CLI shows each request field as the flag its sub-command really has."""
    from impq_tui.cli import SUB_COMMANDS, build_parser
    from impq_tui.cli.args import FLAGS

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command, request_type in (("run", RunRequest), ("solve", SolveRequest), ("eval", EvalRequest),
                                  ("compare", CompareRequest), ("export", ExportRequest)):
        options = {o for a in subparsers[command]._actions for o in a.option_strings}
        for f in fields(request_type):
            if f.name == "run_dir" and command != "run":
                continue                       # the positional DIR
            # a field two flags set (method: --local or --fit) names both
            assert set(FLAGS[f.name].split("/")) <= options, (command, f.name)
        assert hasattr(SUB_COMMANDS[command], "request")


# ------------------------------------------------------------------- damaged model files

@pytest.mark.parametrize("damage", ["truncated-gguf", "config-field-type"])
def test_damaged_model_files_are_a_clear_error(tmp_path, damage):
    if damage == "truncated-gguf":
        model = tmp_path / "model.gguf"
        model.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    else:
        model = tmp_path / "model"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "llama", "hidden_size": "x"}')
    (tmp_path / "cwd").mkdir()
    outcome = invoke(["run", "--model", str(model), "--run-dir", str(tmp_path / "run"), "--quiet"],
                     tmp_path / "cwd")
    assert_clear_error(outcome, "model")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- real argv bytes

def test_non_utf8_argv_in_a_real_process(tmp_path):
    """Bytes that are not UTF-8 reach Python as surrogate escapes: still one clear line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    bad = b"\xff\xfe\xc3"
    argv = [sys.executable.encode(), b"-m", b"impq_tui", b"run", b"--model", b"/nonexistent/" + bad,
            b"--calib-text", bytes(tmp_path) + b"/" + bad + b".txt", b"--run-dir",
            bytes(tmp_path) + b"/run-" + bad, b"--quiet"]
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    COUNTS["cli_argv_inputs"] += 1
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "--calib-text" in err and "does not exist" in err
    assert not any(tmp_path.iterdir())
