"""core.data on real files and a real (small, locally trained) fast tokenizer."""

import json
import logging
import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from core.data import TEXT_CHOICES, describe, load_text, token_windows
from core.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on the builtin text: every string encodes, none is unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<bos>"])
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", model_max_length=512)


@pytest.fixture(scope="module")
def calibration():
    return load_text("builtin", "calibration")


# --- builtin -----------------------------------------------------------------------


def test_builtin_halves_partition_the_topics():
    cal, ev = load_text("builtin", "calibration"), load_text("builtin", "evaluation")
    keys = sorted(topics)
    assert cal + "\n\n" + ev == "\n\n".join(topics[k] for k in keys)
    # The cut falls on a topic boundary: each topic lies wholly in one half.
    k = next(i for i in range(1, len(keys)) if "\n\n".join(topics[j] for j in keys[:i]) == cal)
    assert ev == "\n\n".join(topics[j] for j in keys[k:])
    # ...and the boundary nearest the middle, so the halves differ by less than a topic.
    assert abs(len(cal) - len(ev)) <= max(len(v) for v in topics.values())
    assert load_text("builtin", "calibration") == cal  # deterministic


def test_describe():
    assert describe("builtin") == "builtin (pydoc topics)"
    assert describe("/some/dir/corpus.jsonl") == "corpus.jsonl"
    assert set(TEXT_CHOICES) == {"builtin", "wikitext2", "c4"}


def test_unknown_role_is_a_programming_error():
    with pytest.raises(ValueError):
        load_text("builtin", "train")


# --- token windows -----------------------------------------------------------------


def test_windows_are_sorted_slices_of_the_token_stream(tokenizer, calibration):
    ids = tokenizer(calibration, add_special_tokens=False, verbose=False)["input_ids"]
    T = 64
    w = token_windows(calibration, tokenizer, n_windows=10, window_tokens=T, seed=0)
    assert w.shape == (10, T) and w.dtype == torch.long
    chunks = {tuple(ids[p * T:(p + 1) * T]): p for p in range(len(ids) // T)}
    positions = [chunks[tuple(row.tolist())] for row in w]  # KeyError if not a chunk
    assert positions == sorted(set(positions))
    assert tokenizer.bos_token_id not in w  # no special tokens added


def test_windows_depend_on_seed_only(tokenizer, calibration):
    a = token_windows(calibration, tokenizer, 8, 32, seed=1)
    assert torch.equal(a, token_windows(calibration, tokenizer, 8, 32, seed=1))
    assert not torch.equal(a, token_windows(calibration, tokenizer, 8, 32, seed=2))


def test_all_chunks_can_be_taken(tokenizer):
    text = "alpha beta gamma delta " * 50
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) // 10
    w = token_windows(text, tokenizer, n, 10, seed=0)
    assert w.shape == (n, 10)
    with pytest.raises(UserError, match=f"at most {n} windows"):
        token_windows(text, tokenizer, n + 1, 10, seed=0)


def test_too_short_for_one_window(tokenizer):
    n = len(tokenizer("hello world", add_special_tokens=False)["input_ids"])
    with pytest.raises(UserError, match=f"has {n} tokens, fewer than the 1000 one window"):
        token_windows("hello world", tokenizer, 1, 1000, seed=0)


@pytest.mark.parametrize("n, t", [(0, 16), (1, 1)])
def test_bad_window_counts(tokenizer, n, t):
    with pytest.raises(UserError):
        token_windows("some text " * 100, tokenizer, n, t, seed=0)


def test_long_text_gives_no_length_warning(tokenizer, calibration, caplog):
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            token_windows(calibration, tokenizer, 4, 128, seed=0)
    finally:
        hf_logging.disable_propagation()
    assert "longer than the specified maximum" not in caplog.text


# --- local files -------------------------------------------------------------------


def test_txt(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("Ünïcode text\nsecond line\n", encoding="utf-8")
    assert load_text(str(p), "calibration") == "Ünïcode text\nsecond line\n"
    assert load_text(str(p), "evaluation") == load_text(str(p), "calibration")


def test_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n"
                 + json.dumps({"text": "second"}) + "\n", encoding="utf-8")
    assert load_text(str(p), "calibration") == "first\n\nsecond"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["first", None, "second"], "n": [1, 2, 3]}), p)
    assert load_text(str(p), "evaluation") == "first\n\nsecond"
    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["x"]}), q)
    with pytest.raises(UserError, match="no `text` column"):
        load_text(str(q), "evaluation")


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8 text"),
    ("empty.txt", b"", "empty"),
    ("blank.txt", b" \n\t\n", "empty"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', "line 3"),
    ("nofield.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "line 2"),
    ("notobject.jsonl", b'["text"]\n', "line 1"),
    ("surrogate.jsonl", b'{"text": "\\ud800"}\n', "line 1"),
    ("emptytexts.jsonl", b'{"text": ""}\n{"text": " "}\n', "empty"),
    ("corpus.csv", b"text\nhello\n", "unknown extension"),
])
def test_bad_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_text(str(p), "calibration")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"), "calibration")
    (tmp_path / "d.txt").mkdir()
    with pytest.raises(UserError, match="directory"):
        load_text(str(tmp_path / "d.txt"), "calibration")


@pytest.mark.parametrize("spec", ["wikitext2", "c4"])
def test_hub_text_offline_names_alternatives(monkeypatch, spec):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_text(spec, "calibration")
    assert "builtin" in str(e.value) and ".jsonl" in str(e.value) and ".parquet" in str(e.value)


def test_unreachable_hub_fails_at_the_probe(monkeypatch):
    pytest.importorskip("datasets")
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError, match="cannot be reached.*HF_HUB_OFFLINE=1.*builtin"):
        load_text("wikitext2", "evaluation")


_jsonl_like = st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["text", "id"]), st.one_of(st.text(), st.integers())),
    st.text(), st.integers(), st.none()), max_size=5).map(
    lambda rows: "\n".join(json.dumps(r) for r in rows).encode("utf-8"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                         _jsonl_like),
       suffix=st.sampled_from([".txt", ".jsonl"]))
def test_any_bytes_give_a_string_or_a_user_error(content, suffix):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"f{suffix}"
        p.write_bytes(content)
        try:
            text = load_text(str(p), "calibration")
        except UserError:
            return
        assert isinstance(text, str) and text.strip()
        text.encode("utf-8")  # a tokenizer can take it
