"""The headless command line on real tiny checkpoints: run, solve, eval, resume after
SIGKILL, and every bad input a user can give (exit 2, one paragraph, no traceback,
nothing half-written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
TINY_RUN = ["--windows", "4", "--window-tokens", "32", "--device", "cpu", "--quiet"]


def cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase.lower() in proc.stderr.lower(), proc.stderr


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "done"
    cli("run", "--model", tiny_model_dir, "--samples", 4, "--run-dir", path, *TINY_RUN, check=True)
    return path


def test_run_writes_samples_and_costs(finished_run):
    run = RunDir.open(finished_run)
    D = run.D()
    assert D.shape == (4, 4)
    records = run.samples()
    for r in records:
        assert sum(r["d"]) == pytest.approx(r["v_low"] - r["v_high"], abs=1e-12)
    costs = run.costs()
    assert all(hi > lo > 0 for lo, hi in zip(costs.m_lo, costs.m_hi))
    assert run.config.samples == 4 and run.config.backend == "quanto"


def test_solve_table_is_the_json_record(finished_run):
    """What `solve` prints (impq_tui.report) says what its --json record says."""
    from io import StringIO

    from rich.console import Console

    from core.evaluate import allocate
    from core.interactions import quadratic_model
    from impq_tui.report import allocation_report

    record = json.loads(cli("solve", finished_run, "--bits", "2.5", "--json", check=True).stdout)
    run = RunDir.open(finished_run)
    alloc = allocate(run, bits=2.5)
    model = quadratic_model(run.D(), paired=run.config.antithetic)
    console = Console(width=200, record=True, file=StringIO())
    console.print(allocation_report(alloc, model, run.costs(), str(run.path)))
    text = console.export_text()
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in text.splitlines()
            if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert [int(r[1]) for r in rows] == record["bits_per_layer"]
    assert [float(r[2]) for r in rows] == pytest.approx(model.phi, abs=1e-5)
    assert f"used {record['bytes']:,} B" in text and f"budget {record['budget_bytes']:,} B" in text
    high = record["bits_per_layer"].count(4)
    assert f"{high} of 4 layers at 4 bits" in text


def test_eval_summary_without_a_simulated_model():
    """GPTQ has no simulated perplexity: the summary leaves it out instead of failing."""
    from types import SimpleNamespace

    from impq_tui.report import eval_summary

    result = SimpleNamespace(backend="gptq", ppl=12.5, ppl_simulated=None, ppl_original=10.0,
                             eval_tokens=4096, eval_text="builtin")
    alloc = SimpleNamespace(avg_bits=2.75, weight_bits=2.5)
    line = eval_summary(result, alloc)
    assert "perplexity 12.500 (real modules); unquantized 10.000" in line
    assert "simulated" not in eval_summary(result, alloc)
    assert "13.000 (simulated)" in eval_summary(SimpleNamespace(**{**vars(result),
                                                                  "ppl_simulated": 13.0}), alloc)


def test_solve_json_schema_and_budget(finished_run):
    out = json.loads(cli("solve", finished_run, "--bits", "2.5", "--json", check=True).stdout)
    assert set(out) >= {"bits_per_layer", "avg_bits", "bytes", "budget_bytes",
                        "predicted_delta_nll", "solver"}
    assert len(out["bits_per_layer"]) == 4 and set(out["bits_per_layer"]) <= {2, 4}
    assert out["bytes"] <= out["budget_bytes"]
    assert out["solver"]["status"] == "optimal" and out["solver"]["seconds"] >= 0
    costs = RunDir(finished_run).costs()
    assert out["bytes"] == sum(hi if b == 4 else lo for lo, hi, b in
                               zip(costs.m_lo, costs.m_hi, out["bits_per_layer"]))
    full = json.loads(cli("solve", finished_run, "--bits", "4", "--json", check=True).stdout)
    assert full["bits_per_layer"] == [4] * 4
    low = json.loads(cli("solve", finished_run, "--bits", "2", "--json", check=True).stdout)
    assert low["bits_per_layer"] == [2] * 4
    assert low["avg_bits"] < out["avg_bits"] < full["avg_bits"]


def test_solve_local_writes_its_own_file(finished_run):
    """--local solves the budget-local model (our extension), says so in the JSON, and
    does not overwrite the paper IMPQ's allocation file; 2.125 and 2.13 get two files."""
    from core.evaluate import allocate

    plain = json.loads(cli("solve", finished_run, "--bits", "2.5", "--json", check=True).stdout)
    local = json.loads(cli("solve", finished_run, "--bits", "2.5", "--json", "--local",
                           check=True).stdout)
    assert plain["method"] == "impq" and local["method"] == "impq-local"
    assert local["bytes"] <= local["budget_bytes"] == plain["budget_bytes"]
    run = RunDir.open(finished_run)
    assert local["bits_per_layer"] == list(allocate(run, bits=2.5, local=True).bits_per_layer)
    folder = finished_run / "allocations"
    assert json.loads((folder / "bits-2.50.json").read_text())["method"] == "impq"
    assert json.loads((folder / "bits-2.50-local.json").read_text())["method"] == "impq-local"
    for bits in ("2.125", "2.13"):
        cli("solve", finished_run, "--bits", bits, "--json", check=True)
    assert (folder / "bits-2.125.json").is_file() and (folder / "bits-2.13.json").is_file()


def test_solve_fit_writes_its_own_file_and_refuses_to_mix(finished_run):
    """--fit solves IMPQ-fit (our extension) into its own file; --local and --fit together
    are refused before anything is read."""
    from core.evaluate import allocate

    fit = json.loads(cli("solve", finished_run, "--bits", "2.5", "--json", "--fit",
                         check=True).stdout)
    assert fit["method"] == "impq-fit" and fit["bytes"] <= fit["budget_bytes"]
    run = RunDir.open(finished_run)
    assert fit["bits_per_layer"] == list(allocate(run, bits=2.5, method="impq-fit").bits_per_layer)
    assert json.loads((finished_run / "allocations" / "bits-2.50-fit.json").read_text()) == fit
    both = cli("solve", finished_run, "--bits", "2.5", "--local", "--fit")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_eval_json(finished_run):
    out = json.loads(cli("eval", finished_run, "--bits", "3", "--json", "--eval-windows", 3,
                         "--eval-window-tokens", 32, check=True).stdout)
    assert out["eval_tokens"] == 3 * 31
    assert out["ppl"] > 1 and out["ppl_simulated"] > 1
    # the real backend modules compute what SPQE simulated
    assert out["ppl"] == pytest.approx(out["ppl_simulated"], rel=1e-4)


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path, finished_run):
    """Killed after its first finished sample, a run resumes to the vectors an
    uninterrupted run gives: sample m depends only on the seed and m, so the first four
    rows must equal the 4-sample run's. Many samples keep the kill mid-run however fast
    the machine is (bench/kill_trials.py does this at random moments, 20 times)."""
    path = tmp_path / "killed"
    total = 100_000          # a tiny sample takes milliseconds: the kill must land mid-run
    proc = subprocess.Popen([sys.executable, "-m", "impq_tui", "run", "--model", str(tiny_model_dir),
                             "--samples", str(total), "--run-dir", str(path), *TINY_RUN],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = path / "samples.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and samples.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = len(RunDir(path).samples())
    assert 1 <= done_before < total, "the kill should land mid-run"
    target = max(done_before + 2, 4)
    cli("run", "--resume", path, "--samples", target, "--quiet", check=True)
    D = RunDir(path).D()
    assert D.shape == (target, 4)
    np.testing.assert_array_equal(D[:4], RunDir(finished_run).D())


def test_resume_can_extend_samples(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "extended"
    shutil.copytree(finished_run, copy)
    (copy / "run.lock").unlink()
    cli("run", "--resume", copy, "--samples", 5, "--quiet", check=True)
    D = RunDir(copy).D()
    assert D.shape == (5, 4)
    np.testing.assert_array_equal(D[:4], RunDir(finished_run).D())


# ---------------------------------------------------------------- bad input

def test_missing_model_path(tmp_path):
    proc = cli("run", "--model", tmp_path / "no-such-model", "--run-dir", tmp_path / "r", *TINY_RUN)
    assert_user_error(proc, "does not exist")
    assert not (tmp_path / "r").exists()


def test_unknown_hub_id(tmp_path):
    proc = cli("run", "--model", "nobody-here/no-such-model-xyz", "--run-dir", tmp_path / "r", *TINY_RUN)
    assert_user_error(proc, "no-such-model-xyz")
    assert not (tmp_path / "r").exists()


def test_unsupported_architecture(tmp_path, tiny_tokenizer):
    from transformers import BertConfig, BertModel

    model_dir = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, vocab_size=len(tiny_tokenizer))).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    proc = cli("run", "--model", model_dir, "--run-dir", tmp_path / "r", *TINY_RUN)
    assert_user_error(proc, "decoder-only")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bits", ["1.5", "4.5", "nan", "abc"])
def test_budget_outside_range(finished_run, bits):
    assert_user_error(cli("solve", finished_run, "--bits", bits), "--bits")


def test_budget_below_all_2bit(finished_run):
    costs = RunDir(finished_run).costs()
    proc = cli("solve", finished_run, "--budget-bytes", costs.B_lo - 1)
    assert_user_error(proc, f"{costs.B_lo:,}")


def test_empty_and_too_short_text(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert_user_error(cli("run", "--model", tiny_model_dir, "--calib-text", empty,
                          "--run-dir", tmp_path / "r1", *TINY_RUN), "empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_user_error(cli("run", "--model", tiny_model_dir, "--calib-text", short,
                          "--run-dir", tmp_path / "r2", *TINY_RUN), "tokens")
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_samples_zero(tiny_model_dir, tmp_path):
    assert_user_error(cli("run", "--model", tiny_model_dir, "--samples", 0,
                          "--run-dir", tmp_path / "r", *TINY_RUN), "--samples")
    assert not (tmp_path / "r").exists()


def test_resume_not_a_run(tmp_path):
    assert_user_error(cli("run", "--resume", tmp_path), "not an impq-tui run directory")


def test_resume_with_other_config_is_refused(finished_run):
    before = (finished_run / "config.json").read_text()
    proc = cli("run", "--resume", finished_run, "--seed", 99, "--quiet")
    assert_user_error(proc, "seed")
    assert (finished_run / "config.json").read_text() == before


def test_damaged_run_is_reported(finished_run, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(finished_run, copy)
    lines = (copy / "samples.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"d": [', '"d": [1.0, ', 1)
    (copy / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert_user_error(cli("solve", copy, "--bits", "3"), "line 2")
    config = json.loads((copy / "config.json").read_text())
    config["seed"] = 5
    (copy / "config.json").write_text(json.dumps(config))
    assert_user_error(cli("solve", copy, "--bits", "3"), "config_hash")


def test_existing_run_dir_is_not_overwritten(finished_run, tiny_model_dir):
    before = (finished_run / "samples.jsonl").read_bytes()
    proc = cli("run", "--model", tiny_model_dir, "--run-dir", finished_run, *TINY_RUN)
    assert_user_error(proc, "already exists")
    assert (finished_run / "samples.jsonl").read_bytes() == before


# ---------------------------------------------------------------- the real embedded model

@pytest.mark.slow
def test_end_to_end_on_the_embedded_model(tmp_path):
    path = tmp_path / "smol"
    cli("run", "--samples", 1, "--windows", 2, "--window-tokens", 64, "--device", "cpu",
        "--run-dir", path, "--quiet", check=True, timeout=900)
    D = RunDir(path).D()
    assert D.shape == (1, 30)
    out = json.loads(cli("solve", path, "--bits", "2.5", "--json", check=True).stdout)
    assert len(out["bits_per_layer"]) == 30 and out["bytes"] <= out["budget_bytes"]
    ev = json.loads(cli("eval", path, "--bits", "2.5", "--json", "--eval-windows", 2,
                        "--eval-window-tokens", 64, check=True, timeout=900).stdout)
    # a pretrained model: far better than chance (vocab 49,152) on English, worse once
    # quantized (2-bit min-max layers hurt SmolLM2 badly, so only finiteness bounds ppl)
    assert 1 < ev["ppl_original"] < 100
    assert ev["ppl_original"] < ev["ppl"] < float("inf")
    assert ev["ppl"] == pytest.approx(ev["ppl_simulated"], rel=1e-3)


def test_the_app_without_a_terminal_refuses_at_once(tmp_path):
    """Under cron or CI (stdin and stdout not a terminal) the app says so and exits 2,
    instead of writing escape codes and waiting for keys."""
    proc = subprocess.run([sys.executable, "-m", "impq_tui"], env=ENV, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs a terminal" in proc.stderr
    assert "\x1b[" not in proc.stdout


@pytest.mark.parametrize("backend,windows", [("quanto", 4), ("hqq", 4), ("gptq", 16), ("gguf", 16), (None, 4)])
def test_gpu_calibration_windows_follow_the_backend(monkeypatch, backend, windows):
    """A new run on a GPU calibrates quanto and HQQ on 4 windows, GPTQ and GGUF (whose
    Hessians and importance matrix come from those windows) on 16, as do the studies, which
    give no backend; no backend given to `run` is quanto's. On a CPU every backend keeps 8
    windows of 128 tokens. Only the config is built: no GPU is needed."""
    import torch

    import core.models
    from core.requests import RunRequest
    from core.runs import RunConfig
    from core.settings import device_defaults
    from impq_tui.cli.run import _new_config

    monkeypatch.setattr(core.models, "pick_device", lambda device=None: torch.device(device or "cuda"))
    req = RunRequest(model="embedded", backend=backend)
    config = _new_config(req)
    assert RunConfig.backend == "quanto"
    assert (config.windows, config.window_tokens, config.device) == (windows, 2048, "cuda")
    assert device_defaults(torch.device("cuda"))["windows"] == 16
    assert _new_config(RunRequest(model="embedded", backend=backend, windows=16)).windows == 16
    cpu = _new_config(RunRequest(model="embedded", backend=backend, device="cpu"))
    assert (cpu.windows, cpu.window_tokens) == (8, 128)
