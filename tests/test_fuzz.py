"""Input fuzzing with hypothesis (issue 7, reliability).

The text loaders take binary garbage, invalid UTF-8, BOMs, NUL bytes, empty and huge
lines and damaged parquet files; the command line takes odd budgets, odd numbers and odd
flags. Every input gets a result or a clear error -- a UserError that names the file, or
a one-line message and a non-zero exit -- never a traceback, never a hang, and bad input
destroys no earlier work (the fixture run's samples, config and costs stay byte for byte).

No fuzz case loads a model: transformers' from_pretrained (and the random and embedded
model builders) are replaced by a tripwire. Every generated `run`/`eval`/`export`/
`compare` command line carries at least one invalid part, and the oracle below says
which; only a case the oracle calls valid may reach the tripwire.

IMPQ_FUZZ_SCALE multiplies the example counts; IMPQ_FUZZ_COUNTS names a JSON file that
receives how many inputs were tried (bench/fuzz_counts.py uses both).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from core.data import load_text, token_windows
from core.errors import UserError

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


def assert_clear_error(outcome: Outcome, mentions: list[str]) -> None:
    """A non-zero exit whose last stderr line is the one error line, naming what was wrong."""
    assert outcome.code not in (0, None), (outcome.code, outcome.err)
    lines = [ln for ln in outcome.err.split("\n") if ln.strip()]
    assert lines, "no message on stderr"
    match = ERROR_LINE.match(lines[-1])
    assert match, lines[-1]
    message = match.group(1).lower()
    assert len(message) < 1200, message
    assert any(m.lower() in message for m in mentions), (mentions, message)


# ------------------------------------------------------------------- parts of argv
# A part is (tokens, verdict, mentions): verdict "ok", "bad" (the command must refuse it
# and may name it) or "maybe" (depends on the machine or argparse corner cases).

MAX_BUDGET = 10**18         # what the CLI accepts as --budget-bytes
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


def as_float(v):
    try:
        return float(v)
    except ValueError:
        return None


def as_int(v):
    try:
        return int(v)
    except ValueError:
        return None


def in_range(parse, lo, hi):
    def check(v):
        x = parse(v)
        return x is not None and lo <= x <= hi
    return check


is_bits = in_range(as_float, 2.0, 4.0)
is_positive = in_range(as_int, 1, float("inf"))
is_alpha = in_range(as_float, 0.0, 1.0)


@st.composite
def option(draw, name: str, values, check, mentions: list[str] | None = None):
    """`--name value` or `--name=value`, "ok" when check(value) holds."""
    value = draw(values)
    mentions = mentions or [name]
    if draw(st.booleans()):
        tokens = [f"{name}={value}"]
    else:
        tokens = [name, value]
        if value.startswith("-") and not NEG_NUMBER.match(value) and " " not in value:
            return tokens, "bad", [name]   # argparse reads the value as a flag
    return tokens, ("ok" if check(value) else "bad"), mentions


def flag(name: str):
    return st.just(([name], "ok", [name]))


ODD_TOKENS = [(["--bogus"], "bad"), (["-x"], "bad"), (["extra"], "bad"), (["--BITS"], "bad"),
              (["—bits"], "bad"), (["-"], "bad"), (["--json=1"], "bad"), (["--alpha"], "bad"),
              (["--quiet=yes"], "bad"), (["--"], "maybe"), (["\x00"], "bad"), (["--bits-x", "3"], "bad")]


def odd_tokens():
    """A token no sub-command takes: unknown flags, a stray word, a flag with no value."""
    def part(item):
        tokens, verdict = item
        return tokens, verdict, [tokens[0].split("=")[0], "unrecognized", "expected one argument"]
    return st.sampled_from(ODD_TOKENS).map(part)


def value_of(tokens: list[str]) -> str:
    return tokens[1] if len(tokens) == 2 else tokens[0].split("=", 1)[1]


def late_checks(parts, s: "Scratch", alpha: bool = True, budget: bool = True) -> list:
    """The checks made after parsing, on the last occurrence of an option (argparse keeps
    the last value): --alpha in [0, 1], --budget-bytes at least the all-2-bit size."""
    def last(name):
        found = [p for p in parts if p[0] and p[0][0].split("=")[0] == name and p[1] == "ok"]
        return value_of(found[-1][0]) if found else None

    extra = []
    a = last("--alpha") if alpha else None
    if a is not None and not is_alpha(a):
        extra.append(([], "bad", ["--alpha"]))
    b = last("--budget-bytes") if budget else None
    if b is not None and as_int(b) < s.min_budget:
        extra.append(([], "bad", ["budget"]))
    return extra


def verdict(parts) -> str:
    verdicts = {p[1] for p in parts}
    return "bad" if "bad" in verdicts else "maybe" if "maybe" in verdicts else "ok"


def mentions(parts) -> list[str]:
    return [m for p in parts if p[1] != "ok" for m in p[2]]


def flatten(parts) -> list[str]:
    return [t for p in parts for t in p[0]]


# ------------------------------------------------------------------- shared scratch

class Scratch:
    """Files for the command lines; `run` is a copy of the fixture run (commands may write
    into it), `pristine` its protected files' bytes."""

    def __init__(self, root: Path, run: Path, min_budget: int):
        self.root, self.run, self.min_budget = root, run, min_budget
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
    costs = json.loads((run / "costs.json").read_text())
    s = Scratch(root=root, run=run, min_budget=sum(costs["m_lo"]))
    s.pristine = s.protected()
    assert s.pristine == {name: (FIXTURE / name).read_bytes() for name in PROTECTED}
    return s


def cwd_of(s: Scratch) -> Path:
    return s.root / "cwd"


def reached_model(outcome: Outcome) -> bool:
    """The tripwire, or (where the fixture's model is not on this machine) the error that
    load_model gives first for a missing checkpoint."""
    return outcome.reached_model or (outcome.code == 2 and "does not exist" in outcome.err
                                     and "impq-tui-tiny8" in outcome.err)


def device_part():
    cuda = torch.cuda.is_available()
    choices = [("cpu", "ok"), ("", "ok"), ("auto", "ok"), ("cuda", "ok" if cuda else "bad"),
               ("cuda:0", "ok" if cuda else "bad"), ("gpu", "bad"), ("cpu:0", "bad"),
               ("cuda:x", "bad"), ("mps", "bad"), ("CUDA", "bad"), ("cuda:-1", "bad")]
    return st.sampled_from(choices).map(
        lambda c: (["--device", c[0]], c[1], ["--device", "cuda", "device"]))


def text_part(s: Scratch, name: str):
    r = s.root
    choices = [("builtin", "ok"), (str(r / "ok.txt"), "ok"), ("wikitext2", "ok"), ("c4", "ok"),
               (str(r / "missing.txt"), "bad"), (str(r / "empty.txt"), "bad"),
               (str(r / "blank.jsonl"), "bad"), (str(r / "latin1.txt"), "bad"),
               (str(r / "bad.jsonl"), "bad"), (str(r / "garbage.parquet"), "bad"),
               (str(r / "nonempty"), "bad"), ("notes.docx", "bad"), ("", "bad"),
               ("/dev/zero", "bad"), ("a" * 300 + ".txt", "bad")]
    return st.sampled_from(choices).map(lambda c: ([name, c[0]], c[1], [name]))


def budget_parts(s: Scratch):
    """--bits / --budget-bytes: half the time exactly one of them (the other parts decide),
    else 0-2 occurrences of each (argparse: one of them, required)."""
    bits = option("--bits", numbers, is_bits)
    huge = st.sampled_from(["9" * 400, str(10**30), str(2**64), str(10**18), str(10**18 + 1)])
    budget = option("--budget-bytes", numbers | huge | st.integers(100_000, 300_000).map(str),
                    in_range(as_int, 1, MAX_BUDGET))

    @st.composite
    def parts(draw):
        if draw(st.booleans()):
            return [draw(bits | budget)]
        b = draw(st.lists(bits, max_size=2))
        m = draw(st.lists(budget, max_size=2))
        found = b + m
        if b and m:
            found.append(([], "bad", ["not allowed with"]))
        elif not b and not m:
            found.append(([], "bad", ["--bits", "required"]))
        return found
    return parts()


def alpha_parts():
    """0-2 times --alpha; argparse parses each, the range is checked on the last (late_checks)."""
    return st.lists(option("--alpha", numbers, lambda v: as_float(v) is not None), max_size=2)


# ------------------------------------------------------------------- solve

plausible_bits = st.one_of(
    st.floats(1.9, 4.1).map(lambda x: st_format(x)),
    st.sampled_from(["2", "4", "2.0000001", "3.9999999", "4.0000001", "1.9999999", "2.5",
                     "+3", " 3 ", "3e0", "٣", "3_0", "1e308", "nan", "-inf", "inf"]))
plausible_budgets = st.one_of(
    st.integers(100_000, 250_000).map(str),
    st.sampled_from(["110592", "110591", "184320", "184321", str(10**18), str(10**18 + 1),
                     "9" * 400, "1" * 5000, str(2**64), "1_000_000", "0", "-1"]))
plausible_alphas = st.one_of(
    st.floats(-0.1, 1.1).map(repr),
    st.sampled_from(["0", "1", "0.0", "1.0", "nan", "1e-320", "-0.0", "1.0000001", "inf"]))


def st_format(x: float) -> str:
    return f"{x:.{int(x * 1000) % 9}f}"


@settings(max_examples=examples(70), **FUZZ)
@given(data=st.data())
def test_solve_with_odd_budgets_and_flags(scratch, data):
    s = scratch
    if data.draw(st.booleans()):     # near the edges of what is valid
        parts = [data.draw(option("--bits", plausible_bits, is_bits)
                           | option("--budget-bytes", plausible_budgets,
                                    in_range(as_int, 1, MAX_BUDGET)))]
        parts += data.draw(st.lists(option("--alpha", plausible_alphas,
                                           lambda v: as_float(v) is not None), max_size=1))
        parts += data.draw(st.lists(flag("--json"), max_size=1))
    else:                            # anything
        parts = data.draw(budget_parts(s)) + data.draw(alpha_parts())
        parts += data.draw(st.lists(flag("--json"), max_size=2))
        parts += data.draw(st.lists(odd_tokens(), max_size=1))
    parts = data.draw(st.permutations(parts))
    parts += late_checks(parts, s)
    argv = ["solve", str(s.run), *flatten(parts)]
    before = s.protected()
    outcome = invoke(argv, cwd_of(s))
    event(f"{verdict(parts)} -> {outcome.summary}")
    assert not outcome.reached_model
    expected = verdict(parts)
    if expected == "bad":
        assert_clear_error(outcome, mentions(parts))
    elif expected == "ok":
        assert outcome.code == 0, outcome.err
        if "--json" in argv:
            record = json.loads(outcome.out.strip().split("\n")[-1])
            assert len(record["bits_per_layer"]) == 8 and record["bytes"] <= record["budget_bytes"]
    else:
        assert outcome.code == 0 or ERROR_LINE.match(outcome.err.strip().split("\n")[-1])
    assert s.protected() == before == s.pristine


# ------------------------------------------------------------------- run (new runs)

def model_part(s: Scratch):
    r = s.root
    bad = ["/nonexistent-impq-fuzz/model", str(r / "missing-model"), "random:bogus", "random:",
           str(r / "m.gguf"), str(r / "badcfg"), str(r / "nomodel"), str(r / "nonempty"),
           "~/no-such-impq-model", "./not-here.gguf", str(r / "ok.txt")]
    return st.sampled_from(bad).map(lambda m: (["--model", m], "bad", ["model", m.lower()]))


def run_dir_part(s: Scratch):
    def make(kind):
        if kind == "fresh":
            return [str(s.fresh("run"))], "ok"
        if kind == "empty-dir":
            path = s.fresh("emptydir")
            path.mkdir(parents=True)
            return [str(path)], "ok"
        return {"file": ([str(s.root / "plain-file")], "bad"),
                "nonempty": ([str(s.root / "nonempty")], "bad"),
                "under-file": ([str(s.root / "plain-file" / "run")], "bad"),
                "too-long": ([str(s.root / ("n" * 300))], "bad"),
                "empty": ([""], "bad"),
                "fixture": ([str(s.run)], "bad")}[kind]

    def part(kind):
        tokens, v = make(kind)
        return ["--run-dir", *tokens], v, ["--run-dir", "run directory", *tokens]
    return st.sampled_from(["fresh", "fresh", "empty-dir", "file", "nonempty", "under-file",
                            "too-long", "empty", "fixture"]).map(part)


def run_option_parts(s: Scratch):
    """Options of `run` other than --model/--run-dir/--resume, each 0 or 1 times."""
    max_samples = 1_000_000
    seed_ok = in_range(as_int, 0, 2**63 - 1)
    cuda = torch.cuda.device_count()
    return [
        text_part(s, "--calib-text"),
        st.sampled_from([("quanto", "ok"), ("hqq", "ok"), ("gptq", "bad"), ("QUANTO", "bad"),
                         ("", "bad")]).map(lambda c: (["--backend", c[0]], c[1], ["--backend"])),
        option("--group-size", numbers, is_positive),
        option("--samples", numbers, in_range(as_int, 1, max_samples), ["--samples"]),
        option("--windows", numbers, is_positive),
        option("--window-tokens", numbers, in_range(as_int, 2, float("inf"))),
        option("--seed", numbers, seed_ok),
        device_part(),
        option("--micro-batch", numbers, is_positive),
        option("--gpus", numbers, in_range(as_int, 1, max(1, cuda))),
        flag("--antithetic"), flag("--compile"), flag("--quiet"),
    ]


@st.composite
def some_of(draw, strategies):
    chosen = draw(st.lists(st.sampled_from(range(len(strategies))), unique=True,
                           max_size=len(strategies)))
    return [draw(strategies[i]) for i in chosen]


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
    run_dirs = [p[0][1] for p in parts if p[0] and p[0][0] == "--run-dir"]
    existed = {d: os.path.exists(d) for d in run_dirs if d}
    outcome = invoke(argv, cwd_of(s))
    event(f"{verdict(parts)} -> {outcome.summary}")
    assert not outcome.reached_model, "a bad `run` got as far as loading weights"
    assert_clear_error(outcome, mentions(parts))
    for d, was in existed.items():       # nothing half-made is left behind
        if not was:
            assert not os.path.exists(d), f"{d} was left behind"
    assert (s.root / "nonempty" / "keep.txt").read_text() == "earlier work"
    assert not list((cwd_of(s)).glob("runs/*")), "a default run directory was left behind"


# ------------------------------------------------------------------- run --resume

IDENTITY_SAME = {"--model": "/tmp/impq-tui-tiny8", "--calib-text": "builtin", "--backend": "quanto",
                 "--group-size": "64", "--windows": "4", "--window-tokens": "32", "--seed": "0"}


def resume_identity_parts():
    """Options that decide the sample vectors: the run's own values, or others (refused)."""
    def same_or_other(name, others):
        return st.sampled_from([IDENTITY_SAME[name], *others]).map(
            lambda v: ([name, v], "ok" if v == IDENTITY_SAME[name] else "bad",
                       [name, name.lstrip("-").replace("-", "_"), "different configuration"]))
    return [same_or_other("--model", ["/tmp/impq-tui-tiny8/", "/nonexistent/model"]),
            same_or_other("--calib-text", ["c4"]),
            same_or_other("--backend", ["hqq", "nope"]),
            same_or_other("--group-size", ["32", "0", "x"]),
            same_or_other("--windows", ["8", "-4"]),
            same_or_other("--window-tokens", ["64", "1"]),
            same_or_other("--seed", ["1", "-1", str(2**64)]),
            st.just((["--antithetic"], "bad", ["antithetic", "different configuration"]))]


@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_resume_never_damages_the_run(scratch, data):
    s = scratch
    cuda = torch.cuda.device_count()
    if data.draw(st.booleans()):    # only what a resume may change: valid, or nearly
        parts = data.draw(some_of([
            option("--samples", st.integers(0, 30).map(str), in_range(as_int, 1, 1_000_000)),
            option("--micro-batch", st.integers(0, 16).map(str), is_positive),
            option("--gpus", st.integers(1, 3).map(str), in_range(as_int, 1, max(1, cuda))),
            st.sampled_from(["cpu", ""]).map(lambda d: (["--device", d], "ok", ["--device"])),
            flag("--compile"), flag("--quiet"),
            *[st.just(([k, v], "ok", [k])) for k, v in IDENTITY_SAME.items()]]))
    else:
        parts = data.draw(resume_anything(s, cuda))
    parts = data.draw(st.permutations(parts))
    target = data.draw(st.sampled_from(["run"] * 6 + ["file", "missing", "empty"]))
    resume = {"run": str(s.run), "file": str(s.root / "plain-file"),
              "missing": str(s.root / "no-such-run"), "empty": ""}[target]
    if target != "run":
        parts.append(([], "bad", ["run directory", "--resume", resume or "--resume"]))
    check_resume(s, parts, resume)


@st.composite
def resume_anything(draw, s: Scratch, cuda: int):
    parts = draw(some_of([
        *resume_identity_parts(),
        option("--samples", numbers | st.integers(1, 20).map(str), in_range(as_int, 1, 1_000_000)),
        option("--micro-batch", numbers, is_positive),
        option("--gpus", numbers, in_range(as_int, 1, max(1, cuda))),
        device_part(), flag("--compile"), flag("--quiet"),
        run_dir_part(s).map(lambda p: (p[0], "bad", ["--run-dir", "not both"])),
    ]))
    return parts + draw(st.lists(odd_tokens(), max_size=1))


def check_resume(s: Scratch, parts, resume: str) -> None:
    argv = ["run", "--resume", resume, *flatten(parts)]
    before = s.protected()
    outcome = invoke(argv, cwd_of(s))
    event(f"{verdict(parts)} -> {outcome.summary}")
    expected = verdict(parts)
    samples = next((as_int(value_of(p[0])) for p in reversed(parts)
                    if p[0] and p[0][0].split("=")[0] == "--samples"), None)
    if expected == "bad":
        assert not outcome.reached_model, "a bad resume got as far as loading weights"
        assert_clear_error(outcome, mentions(parts))
    elif expected == "ok" and (samples or 12) <= 12:
        assert outcome.code == 0, outcome.err      # nothing left to do: no model needed
    elif expected == "ok":
        assert reached_model(outcome), (outcome.code, outcome.err)
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

def run_dir_arg(s: Scratch):
    choices = [(str(s.run), "ok")] * 5 + [(str(s.root / "plain-file"), "bad"),
                                          (str(s.root / "nonempty"), "bad"),
                                          (str(s.root / "missing-run"), "bad"), ("", "bad")]
    return st.sampled_from(choices).map(
        lambda c: ([c[0]], c[1], ["run directory", "config.json", c[0] or "impq-tui"]))


small_ints = st.integers(-2, 64).map(str)


def eval_window_parts(values=numbers):
    return [option("--eval-windows", values, is_positive),
            option("--eval-window-tokens", values, in_range(as_int, 2, float("inf")),
                   ["--eval-window-tokens"])]


def plausible_budget():
    return (option("--bits", plausible_bits, is_bits)
            | option("--budget-bytes", plausible_budgets, in_range(as_int, 1, MAX_BUDGET)))


def plausible_alpha():
    return st.lists(option("--alpha", plausible_alphas, lambda v: as_float(v) is not None),
                    max_size=1)


def backend_part(gptq: str = "bad"):
    """gptq is no choice of eval/compare ("bad"); for export it depends on the optional
    gptqmodel package ("maybe")."""
    return st.sampled_from([("quanto", "ok"), ("hqq", "ok"), ("gptq", gptq), ("nope", "bad"),
                            ("", "bad")]).map(
        lambda c: (["--backend", c[0]], c[1], ["--backend", "gptq"]))


def check_model_stage(outcome: Outcome, parts) -> None:
    expected = verdict(parts)
    if expected == "bad":
        assert not outcome.reached_model, "bad input got as far as loading weights"
        assert_clear_error(outcome, mentions(parts))
    elif expected == "ok":
        assert reached_model(outcome), (outcome.code, outcome.err)


@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_eval_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    if data.draw(st.booleans()):     # near the edges of what is valid
        parts = [([str(s.run)], "ok", []), data.draw(plausible_budget())]
        parts += data.draw(plausible_alpha())
        parts += data.draw(some_of([text_part(s, "--eval-text"), *eval_window_parts(small_ints),
                                    backend_part(), device_part(), flag("--json")]))
    else:                            # anything
        parts = [data.draw(run_dir_arg(s))]
        parts += data.draw(budget_parts(s)) + data.draw(alpha_parts())
        parts += data.draw(some_of([text_part(s, "--eval-text"), *eval_window_parts(),
                                    backend_part(), device_part(), flag("--json")]))
        parts += data.draw(st.lists(odd_tokens(), max_size=1))
    rest = data.draw(st.permutations(parts[1:]))
    rest += late_checks(rest, s)
    parts = parts[:1] + rest
    argv = ["eval", *parts[0][0], *flatten(rest)]
    before = s.protected()
    outcome = invoke(argv, cwd_of(s))
    event(f"{verdict(parts)} -> {outcome.summary}")
    check_model_stage(outcome, parts)
    assert s.protected() == before == s.pristine


@settings(max_examples=examples(40), **FUZZ)
@given(data=st.data())
def test_compare_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    parts = [data.draw(run_dir_arg(s))]
    bits = data.draw(st.lists(numbers, max_size=4))
    if data.draw(st.booleans()):
        bad = [b for b in bits if not is_bits(b) or (b.startswith("-") and not NEG_NUMBER.match(b)
                                                     and " " not in b)]
        # a value that looks like a flag ends the list and is then "unrecognized"
        parts.append((["--bits", *bits], "bad" if bad or not bits else "ok",
                      ["--bits", "unrecognized", *[b for b in bad if b]]))
    parts += data.draw(alpha_parts())
    parts += data.draw(some_of([text_part(s, "--eval-text"), *eval_window_parts(),
                                backend_part(), device_part(), flag("--json"), flag("--quiet")]))
    parts += data.draw(st.lists(odd_tokens(), max_size=1))
    rest = data.draw(st.permutations(parts[1:]))
    # "--bits a b" takes every following token that is not a flag: no plain word after it
    words = [p for p in rest if p[0] and (not p[0][0].startswith("-") or p[0][0] == "-")]
    assume(not (words and any(p[0] and p[0][0] == "--bits" for p in rest)))
    rest += late_checks(rest, s, budget=False)
    parts = parts[:1] + rest
    argv = ["compare", *parts[0][0], *flatten(rest)]
    before = s.protected()
    outcome = invoke(argv, cwd_of(s))
    event(f"{verdict(parts)} -> {outcome.summary}")
    check_model_stage(outcome, parts)
    assert s.protected() == before == s.pristine


OUT_KINDS = ["fresh", "fresh", "fresh", "empty-dir", "file", "nonempty", "no-parent", "run",
             "in-run", "empty", "dot", "dotdot", "cwd-abs", "root", "home", "no-user"]


def out_part(s: Scratch, kinds=OUT_KINDS):
    def make(kind):
        if kind == "fresh":
            return str(s.fresh("export")), "ok"
        if kind == "empty-dir":
            path = s.fresh("emptyout")
            path.mkdir(parents=True)
            return str(path), "ok"
        return {"file": (str(s.root / "plain-file"), "bad"),
                "nonempty": (str(s.root / "nonempty"), "bad-unless-force"),
                "no-parent": (str(s.root / "missing-parent" / "out"), "bad"),
                "run": (str(s.run), "bad"), "in-run": (str(s.run / "exports" / "x"), "maybe"),
                "empty": ("", "bad"), "dot": (".", "bad"), "dotdot": ("..", "bad"),
                "cwd-abs": (str(cwd_of(s)), "bad"), "root": ("/", "bad"),
                "home": ("~", "bad"), "no-user": ("~no-such-user-impq/out", "bad")}[kind]

    def part(kind):
        value, v = make(kind)
        return ["--out", value], v, ["--out", "export", value or "--out"]
    return st.sampled_from(kinds).map(part)


@settings(max_examples=examples(50), **FUZZ)
@given(data=st.data())
def test_export_refuses_bad_input_before_loading_a_model(scratch, data):
    s = scratch
    if data.draw(st.booleans()):     # near the edges of what is valid
        parts = [([str(s.run)], "ok", []), data.draw(option("--bits", plausible_bits, is_bits))]
        parts.append(data.draw(out_part(s, ["fresh", "fresh", "empty-dir", "nonempty"])))
        parts += data.draw(plausible_alpha())
        windows = eval_window_parts(small_ints)
    else:                            # anything
        parts = [data.draw(run_dir_arg(s))]
        bits = data.draw(st.lists(option("--bits", numbers, is_bits), max_size=2))
        parts += bits or [([], "bad", ["--bits", "required"])]
        out = data.draw(st.lists(out_part(s), max_size=1))
        parts += out or [([], "bad", ["--out", "required"])]
        parts += data.draw(alpha_parts())
        windows = eval_window_parts()
    extra = data.draw(some_of([*windows, backend_part(gptq="maybe"),
                               device_part(), flag("--json"), flag("--force"), flag("--eval"),
                               flag("--verify"), text_part(s, "--eval-text")]))
    evaluating = any(p[0] and p[0][0] in ("--eval", "--verify") for p in extra)
    force = any(p[0] == ["--force"] for p in extra)
    for i, p in enumerate(extra):
        if p[0] and p[0][0] == "--eval-text" and not evaluating:
            extra[i] = (p[0], "ok", p[2])          # read only when evaluating
    parts += extra
    for i, p in enumerate(parts):
        if p[1] == "bad-unless-force":
            parts[i] = (p[0], "ok" if force else "bad", p[2])
    parts += data.draw(st.lists(odd_tokens(), max_size=1))
    rest = data.draw(st.permutations(parts[1:]))
    rest += late_checks(rest, s, budget=False)
    parts = parts[:1] + rest
    argv = ["export", *parts[0][0], *flatten(rest)]
    before = s.protected()
    outcome = invoke(argv, cwd_of(s))
    event(f"{verdict(parts)} -> {outcome.summary}")
    check_model_stage(outcome, parts)
    assert s.protected() == before == s.pristine
    assert (s.root / "nonempty" / "keep.txt").read_text() == "earlier work"
    assert (cwd_of(s)).is_dir()
    partial = [p for p in s.root.rglob(".*partial*")]
    assert not partial, f"half-written export left behind: {partial}"


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
    assert_clear_error(outcome, ["model"])
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
