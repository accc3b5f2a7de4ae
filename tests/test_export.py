"""Export on a real tiny checkpoint: `impq-tui export` for quanto and HQQ (GPTQ where
GPTQModel is installed), loaded back in a fresh Python process with the README's
snippet (the library's own loader, none of our code on the path), perplexity equal to
the in-memory quantized model's on the same tokens, bytes against the budget, refusals,
and interruption."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.export import ROUND_TRIP_RTOL
from core.runs import RunDir
from core.solver import budget_bytes

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
BITS = "3"
EVAL = ["--eval-windows", "3", "--eval-window-tokens", "32"]
# float32 on CPU: the reloaded model runs the same modules on the same tokens; only the
# order of summation differs (transformers' loss against ours). GPTQ computes in bfloat16.
RTOL_FP32, RTOL_BF16 = ROUND_TRIP_RTOL["float32"], ROUND_TRIP_RTOL["bfloat16"]
HAS_GPTQ = importlib.util.find_spec("gptqmodel") is not None


def cli(*args, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def assert_user_error(proc, *phrases: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase.lower() in proc.stderr.lower(), proc.stderr


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export-runs") / "run"
    cli("run", "--model", tiny_model_dir, "--samples", 2, "--windows", 4, "--window-tokens", 32,
        "--device", "cpu", "--quiet", "--run-dir", path, check=True)
    return path


@pytest.fixture(scope="module")
def eval_tokens(tiny_model_dir):
    """The evaluation windows `--eval-windows 3 --eval-window-tokens 32` measure."""
    from transformers import AutoTokenizer

    from core.data import load_text, token_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return token_windows(load_text("builtin", "evaluation"), tokenizer, 3, 32, seed=0)


_PROBE = '''
# --- the test's own check: transformers' loss, and each linear's stored bit-width
import json, math
import torch
tokens = torch.load("tokens.pt")
with torch.no_grad():
    loss = model(input_ids=tokens.to(next(model.parameters()).device), labels=tokens).loss
bits = {}
for name, m in model.named_modules():
    if getattr(m, "weight_qtype", None) is not None:                       # quanto
        bits[name] = m.weight_qtype.bits
    elif isinstance(getattr(m, "meta", None), dict) and "nbits" in m.meta:  # hqq
        bits[name] = int(m.meta["nbits"])
    elif hasattr(m, "qweight") and hasattr(m, "bits"):                      # gptq
        bits[name] = int(m.bits)
with open("probe.json", "w") as f:
    json.dump({"ppl": math.exp(loss.item()), "bits": bits}, f)
'''


ODD = "it's a füll name"   # a quote, a space and non-ASCII: paths are literals, never code


def load_back(out: Path, tokens: torch.Tensor, tmp_path: Path) -> dict:
    """Run the export's README snippet in a fresh process without our code on the path,
    from an unrelated working directory."""
    work = tmp_path / f"elsewhere {ODD}"
    work.mkdir()
    torch.save(tokens, work / "tokens.pt")
    readme = (out / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (work / "load.py").write_text(snippet + _PROBE)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "load.py"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "probe.json").read_text())


def export(run_dir, out, backend, *extra):
    proc = cli("export", run_dir, "--bits", BITS, "--backend", backend, "--out", out, "--json",
               *extra, check=True)
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """One verified export per fast backend, shared by the tests that read them."""
    root = tmp_path_factory.mktemp("exports")
    return {backend: (root / f"{backend} {ODD}",
                      export(run_dir, root / f"{backend} {ODD}", backend, "--verify", *EVAL))
            for backend in ("quanto", "hqq")}


# ---------------------------------------------------------------- the round trip

@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_round_trip_in_a_fresh_process(exports, eval_tokens, backend, tmp_path):
    out, result = exports[backend]
    assert result["eval_tokens"] == 3 * 31
    assert 1 < result["ppl"] < 10_000
    # --verify: the README snippet in a fresh process, on the same tokens
    assert result["ppl_reloaded"] == pytest.approx(result["ppl"], rel=RTOL_FP32)
    # and independently: transformers' own loss on the model the snippet loads
    probe = load_back(out, eval_tokens, tmp_path)
    assert probe["ppl"] == pytest.approx(result["ppl"], rel=RTOL_FP32)
    record = json.loads((out / "allocation.json").read_text())
    expected = {name: layer["bits"] for layer in record["layers"] for name in layer["modules"]}
    assert probe["bits"] == expected
    assert sorted(set(expected.values())) == [2, 4]   # a real mix at 3 bits


@pytest.mark.parametrize("backend", ["quanto", "hqq"])
def test_the_export_is_the_model_eval_measures(exports, run_dir, backend):
    """`eval` and `export --eval` of one allocation on one text: one model, one number."""
    _, exported = exports[backend]
    proc = cli("eval", run_dir, "--bits", BITS, "--backend", backend, "--json", *EVAL, check=True)
    evaluated = json.loads(proc.stdout)
    assert evaluated["bits_per_layer"] == exported["bits_per_layer"]
    assert evaluated["eval_tokens"] == exported["eval_tokens"] == 3 * 31
    assert evaluated["ppl"] == pytest.approx(exported["ppl"], rel=RTOL_FP32)
    assert evaluated["ppl"] == pytest.approx(exported["ppl_reloaded"], rel=RTOL_FP32)


def test_a_cancelled_verify_kills_the_loader_within_a_second(exports, eval_tokens):
    import tempfile
    import threading

    from core.export import verify_export
    from core.spqe import Cancelled

    out, _ = exports["hqq"]
    before = set(Path(tempfile.gettempdir()).glob("impq-verify-*"))
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()   # the loader is still importing torch then
    start = time.monotonic()
    with pytest.raises(Cancelled):
        verify_export(out, eval_tokens, cancel=cancel)
    assert time.monotonic() - start < 2.0
    assert set(Path(tempfile.gettempdir()).glob("impq-verify-*")) == before


def test_quanto_and_hqq_differ(exports):
    """Two libraries, two quantizers: equal perplexities would mean one is not applied."""
    assert exports["quanto"][1]["ppl"] != exports["hqq"][1]["ppl"]


# ---------------------------------------------------------------- bytes and budget

def test_bytes_against_budget_and_disk(exports, run_dir):
    costs = RunDir(run_dir).costs()
    solved = json.loads(cli("solve", run_dir, "--bits", BITS, "--json", check=True).stdout)
    for backend, (out, result) in exports.items():
        assert result["bits_per_layer"] == solved["bits_per_layer"]
        assert result["budget_bytes"] == budget_bytes(costs, float(BITS)) == solved["budget_bytes"]
        assert 0 < result["bytes"] <= result["budget_bytes"]
        record = json.loads((out / "allocation.json").read_text())
        assert record["bytes"] == sum(layer["bytes"] for layer in record["layers"]) == result["bytes"]
        files = record["weight_files"]
        assert result["disk_bytes"] == sum((out / f).stat().st_size for f in files)
        # everything else (embeddings, head) is on disk too, unquantized
        assert result["disk_bytes"] > result["bytes"]
        n_params = sum(costs.params)
        assert result["avg_bits"] == pytest.approx(8 * result["bytes"] / n_params)


def test_hqq_bytes_are_what_the_backend_measures(exports, tiny_model_dir):
    """The bytes read from qmodel.pt equal what core.backends.hqq reports for the same
    modules, the accounting SPQE's budget uses."""
    from core.backends import get_backend
    from core.models import load_model

    out, result = exports["hqq"]
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    backend = get_backend("hqq", 64)
    record = json.loads((out / "allocation.json").read_text())
    for layer, names in zip(record["layers"], loaded.linear_names):
        expected = sum(backend.quantize_weight(loaded.model.get_submodule(n).weight.data,
                                               layer["bits"]).nbytes for n in names)
        assert layer["bytes"] == expected


def test_quanto_keeps_the_runs_group_size(exports, run_dir):
    """quanto's loader would derive another group size (per output channel for these
    tiny layers): the export records the run's, the snippet sets it, and the bytes are
    packed codes (bits/8 a weight) plus a float32 scale and shift per group of it."""
    out, result = exports["quanto"]
    group = RunDir(run_dir).config.group_size
    record = json.loads((out / "allocation.json").read_text())
    assert record["quantization"]["group_size"] == group
    saved = json.loads((out / "group_sizes.json").read_text())
    shapes = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
              "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
    for layer in record["layers"]:
        expected = 0
        for name in layer["modules"]:
            assert saved[name] == group
            rows, cols = shapes[name.rsplit(".", 1)[1]]
            expected += rows * cols * layer["bits"] // 8 + 2 * rows * (cols // group) * 4
        assert layer["bytes"] == expected
    assert "group_sizes.json" in (out / "README.md").read_text()


# ---------------------------------------------------------------- what lies beside the weights

def test_folder_contents(exports, run_dir):
    config = RunDir(run_dir).config
    for backend, (out, result) in exports.items():
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "tokenizer.json", "allocation.json", "README.md"} <= names
        assert not [n for n in names if n.startswith(".")]
        record = json.loads((out / "allocation.json").read_text())
        assert record["run"]["id"] == f"run@{config.identity_hash()}"
        assert record["run"]["samples"] == 2 and record["method"] == "impq"
        assert record["target_bits"] == 3.0 and record["weight_bits"] == pytest.approx(3.0)
        assert record["ppl"]["value"] == result["ppl"] and record["ppl_reloaded"] == result["ppl_reloaded"]
        card = (out / "README.md").read_text()
        assert f"path = Path({str(out)!r})" in card or f"path = {str(out)!r}" in card
        assert f"{result['bytes']:,}" in card
        assert {"quanto": "requantize(", "hqq": "from_quantized("}[backend] in card
        assert (out / "README.md").stat().st_mode & 0o044 == 0o044   # readable by others, like cp
    assert (run_dir / "exports" / f"quanto {ODD}.json").is_file()


# ---------------------------------------------------------------- refusals

def test_non_empty_folder_is_refused_unless_forced(run_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(cli("export", run_dir, "--bits", BITS, "--backend", "hqq", "--out", out),
                      "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = export(run_dir, out, "hqq", "--force")
    assert not (out / "keep.txt").exists() and (out / "qmodel.pt").is_file()
    assert result["out_dir"] == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]      # no leftovers beside it


def test_empty_existing_folder_is_used(run_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export(run_dir, out, "quanto")
    assert (out / "model.safetensors").is_file() and (out / "quantization_map.json").is_file()


def test_bad_targets(run_dir, tmp_path):
    assert_user_error(cli("export", run_dir, "--bits", BITS, "--backend", "hqq", "--out",
                          tmp_path / "no" / "such" / "parent"), "does not exist")
    before = sorted(p.name for p in run_dir.iterdir())
    assert_user_error(cli("export", run_dir, "--bits", BITS, "--backend", "hqq", "--out", run_dir,
                          "--force"), "run directory")
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert_user_error(cli("export", run_dir, "--bits", "4.5", "--backend", "hqq", "--out",
                          tmp_path / "x"), "--bits")
    assert_user_error(cli("export", tmp_path, "--bits", BITS, "--backend", "hqq", "--out",
                          tmp_path / "x"), "not an impq-tui run directory")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(HAS_GPTQ, reason="GPTQModel is installed here")
def test_gptq_without_gptqmodel_says_how_to_install(run_dir, tmp_path):
    proc = cli("export", run_dir, "--bits", BITS, "--backend", "gptq", "--out", tmp_path / "g")
    assert_user_error(proc, "gptqmodel", "impq-tui[gptq]")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- interruption

def _start_export(run_dir, out):
    return subprocess.Popen([sys.executable, "-m", "impq_tui", "export", str(run_dir), "--bits", BITS,
                             "--backend", "quanto", "--out", str(out), "--verify", *EVAL],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_partial(proc, parent: Path, timeout: float = 120) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        partials = [p for p in parent.iterdir() if ".partial-" in p.name]
        if partials and (partials[0] / "model.safetensors").exists():
            return partials[0]
        time.sleep(0.05)
    raise AssertionError(f"no partial export appeared (exit {proc.poll()})")


def test_stopped_export_leaves_nothing(run_dir, tmp_path):
    """SIGTERM (and SIGHUP) stop it as Ctrl-C does: the half-written folder goes too."""
    out = tmp_path / "stopped"
    proc = _start_export(run_dir, out)
    _wait_for_partial(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_no_complete_looking_folder(run_dir, tmp_path):
    out = tmp_path / "killed"
    proc = _start_export(run_dir, out)
    partial = _wait_for_partial(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert partial.name.startswith(".")                        # hidden, and named as unfinished
    # the next export to the same place clears the dead writer's leftovers
    export(run_dir, out, "hqq")
    assert [p.name for p in tmp_path.iterdir()] == ["killed"]


# ---------------------------------------------------------------- GPTQ

@pytest.mark.slow
@pytest.mark.skipif(not HAS_GPTQ, reason="GPTQModel is not installed (pip install 'impq-tui[gptq]')")
def test_gptq_round_trip(run_dir, eval_tokens, tmp_path):
    out = tmp_path / f"gptq {ODD}"
    result = export(run_dir, out, "gptq", "--verify", *EVAL)
    evaluated = json.loads(cli("eval", run_dir, "--bits", BITS, "--backend", "gptq", "--json", *EVAL,
                               check=True).stdout)
    assert evaluated["ppl"] == pytest.approx(result["ppl"], rel=RTOL_BF16)
    # a quanto run: SPQE measured no GPTQ layers, so there is no simulated GPTQ model, and
    # the export says that its allocation came from quanto's errors
    assert evaluated["ppl_simulated"] is None and evaluated["dtype"] == "float16"
    assert any("chosen from quanto's quantization errors" in n for n in result["notes"])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    record = json.loads((out / "allocation.json").read_text())
    low = [i for i, b in enumerate(result["bits_per_layer"]) if b == 2]
    assert config["bits"] == 4 and config["group_size"] == 64
    assert sorted(config["dynamic"]) == sorted(rf"+:^model\.layers\.{i}\." for i in low)
    assert 0 < result["bytes"] <= result["budget_bytes"]
    assert result["ppl_reloaded"] == pytest.approx(result["ppl"], rel=RTOL_BF16)
    probe = load_back(out, eval_tokens, tmp_path)
    assert probe["ppl"] == pytest.approx(result["ppl"], rel=RTOL_BF16)
    assert probe["bits"] == {n: layer["bits"] for layer in record["layers"] for n in layer["modules"]}


def test_the_engine_never_exports_over_the_current_or_home_folder(run_dir, tmp_path, monkeypatch):
    """The app calls export_model with the folder as typed: '.', '..' or '~' with force
    would replace the working directory or the home folder. Refused before any work."""
    from core.errors import UserError
    from core.export import export_model

    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("earlier work")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    run = RunDir.open(run_dir)
    for target in (".", "..", str(work), "~", "/"):
        with pytest.raises(UserError, match="current folder, a folder above it, the home folder"):
            export_model(run, [2] * run.costs().L, "hqq", target, force=True)
    assert (work / "keep.txt").read_text() == "earlier work"
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]
