"""GPTQ measured by SPQE (core.backends.gptq) on a real tiny checkpoint: `run --backend
gptq`, solve, eval and export through the CLI; the export is the model SPQE measured
(the very tensors, its bytes the run's costs, its perplexity when GPTQModel loads it back
the switched model's); bad input refused before loading. Skipped without GPTQModel
(`pip install 'impq-tui[gptq]'`; install.sh --test installs it)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.export import ROUND_TRIP_RTOL

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                reason="GPTQModel is not installed (pip install 'impq-tui[gptq]')")

ROOT = Path(__file__).resolve().parent.parent
# The CLI computes with as many threads as this process (conftest), so that the Hessians
# it accumulates are bit-identical to the ones rebuilt here.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
BITS = "3"
EVAL = ["--eval-windows", "3", "--eval-window-tokens", "32"]
RUN = ["--samples", "2", "--windows", "4", "--window-tokens", "32", "--device", "cpu", "--quiet"]
RTOL_FP16 = ROUND_TRIP_RTOL["float16"]


def cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def gptq_run(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq-runs") / "run"
    cli("run", "--model", tiny_model_dir, "--backend", "gptq", *RUN, "--run-dir", path)
    return path


@pytest.fixture(scope="module")
def exported(gptq_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq-exports") / "measured"
    proc = cli("export", gptq_run, "--bits", BITS, "--backend", "gptq", "--out", out, "--verify",
               "--json", *EVAL)
    return out, json.loads(proc.stdout), proc.stderr


def _stored(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_costs_are_the_exported_tensors_bytes(gptq_run, exported):
    from core.runs import RunDir

    out, result, _ = exported
    costs = RunDir.open(gptq_run).costs()
    record = json.loads((out / "allocation.json").read_text())
    stored = _stored(out)
    assert sorted(set(result["bits_per_layer"])) == [2, 4]       # both levels' bytes are checked
    for layer in record["layers"]:
        i, bits = layer["index"], layer["bits"]
        in_file = sum(stored[f"{name}.{part}"].numel() * stored[f"{name}.{part}"].element_size()
                      for name in layer["modules"] for part in ("qweight", "qzeros", "scales", "g_idx"))
        assert in_file == layer["bytes"] == (costs.m_lo if bits == 2 else costs.m_hi)[i]
        for name in layer["modules"]:   # the per-module bit-width GPTQModel reads back
            rows = stored[f"{name}.qweight"].shape[0]
            assert rows == stored[f"{name}.g_idx"].numel() * bits // 32
    assert result["bytes"] == costs.bytes_of(result["bits_per_layer"]) == result["budget_bytes"]


def test_the_export_is_the_switched_model_spqe_measured(gptq_run, exported, tiny_model_dir):
    """Rebuilt here as SPQE builds it (same windows, dtype, micro-batch): the packed
    tensors are bit-identical to the file's, and the switched (de-quantized) model's
    perplexity is the one GPTQModel gives the export loaded back in a fresh process."""
    from core.backends import backend_for
    from core.data import eval_tokens, load_text, token_windows
    from core.models import load_model
    from core.runs import RunDir
    from core.settings import EvalSettings
    from core.switching import LayerSwitch, perplexity

    out, result, _ = exported
    config = RunDir.open(gptq_run).config
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    windows = token_windows(load_text(config.calib_text, "calibration"), loaded.tokenizer,
                            config.windows, config.window_tokens, config.seed)
    backend = backend_for(config)
    backend.calibrate(loaded, windows, config.micro_batch)
    bits = result["bits_per_layer"]
    real = LayerSwitch(loaded, backend, real=True, keep_original=True, levels=[[b] for b in bits])
    stored = _stored(out)
    for names, b in zip(loaded.linear_names, bits):
        for name in names:
            module = real.module(name, b)
            for part in ("qweight", "scales", "g_idx"):
                assert torch.equal(getattr(module, part).cpu(), stored[f"{name}.{part}"]), (name, part)
            assert torch.equal(backend.checkpoint_qzeros(module).cpu(), stored[f"{name}.qzeros"]), name
    real.restore_original()
    # a second pass from layer 0 (eval does one for the simulated, one for the real model)
    switched = LayerSwitch(loaded, backend, levels=[(2, 4)] * len(bits))
    settings = EvalSettings(text="builtin", windows=3, window_tokens=32, seed=config.seed,
                            dtype="float32")
    tokens = eval_tokens(loaded.tokenizer, settings, config.calib_text, lambda *a, **k: None)
    switched.apply(bits)
    ppl = perplexity(loaded, tokens, config.micro_batch)
    # float16 (the GPTQ checkpoint's compute dtype) against float32: a round trip's tolerance
    assert result["ppl_reloaded"] == pytest.approx(ppl, rel=RTOL_FP16)
    switched.apply([2] * len(bits))       # the allocation matters: not a model that ignores bits
    assert perplexity(loaded, tokens, config.micro_batch) != pytest.approx(ppl, rel=1e-4)


def test_run_solve_eval_export_through_the_cli(gptq_run, exported):
    out, result, _ = exported
    solved = json.loads(cli("solve", gptq_run, "--bits", BITS, "--json").stdout)
    assert solved["bits_per_layer"] == result["bits_per_layer"]
    evaluated = json.loads(cli("eval", gptq_run, "--bits", BITS, "--json", *EVAL).stdout)
    assert evaluated["backend"] == "gptq" and evaluated["dtype"] == "float16"
    # eval and export build the same modules on the same tokens: one perplexity
    assert evaluated["ppl"] == pytest.approx(result["ppl"], rel=1e-9)
    # the simulated model (SPQE's de-quantized weights, float32 here) against the real one
    # in float16, and GPTQModel's loader in a fresh process against both
    assert evaluated["ppl_simulated"] == pytest.approx(evaluated["ppl"], rel=RTOL_FP16)
    assert result["ppl_reloaded"] == pytest.approx(result["ppl"], rel=RTOL_FP16)
    assert evaluated["ppl"] != pytest.approx(evaluated["ppl_original"], rel=1e-6)
    config = json.loads((out / "config.json").read_text())
    quantization = config["quantization_config"]
    low = [i for i, b in enumerate(result["bits_per_layer"]) if b == 2]
    assert quantization["bits"] == 4 and quantization["group_size"] == 64
    assert sorted(quantization["dynamic"]) == sorted(rf"+:^model\.layers\.{i}\." for i in low)
    record = json.loads((out / "allocation.json").read_text())
    assert record["quantization"]["allocation_from"] == "gptq"
    assert "ones SPQE measured" in " ".join(record["notes"])
    assert "ones SPQE measured" in (out / "README.md").read_text()
    costs = json.loads((gptq_run / "costs.json").read_text())
    assert costs["m_lo"] < costs["m_hi"]


def test_a_gptq_export_of_another_backends_run_says_so(tiny_model_dir, tmp_path):
    run = tmp_path / "hqq run"
    cli("run", "--model", tiny_model_dir, "--backend", "hqq", *RUN, "--run-dir", run)
    out = tmp_path / "gptq of hqq"
    proc = cli("export", run, "--bits", BITS, "--backend", "gptq", "--out", out, "--json")
    result = json.loads(proc.stdout)
    assert "chosen from hqq's quantization errors" in proc.stderr.replace("\n", " ")
    assert any("chosen from hqq's" in note for note in result["notes"])
    assert "chosen from hqq's" in (out / "README.md").read_text().replace("\n", " ")
    record = json.loads((out / "allocation.json").read_text())
    assert record["quantization"]["allocation_from"] == "hqq" and record["run"]["backend"] == "hqq"
    assert record["bytes"] <= record["budget_bytes"]


@pytest.mark.parametrize("args, phrases", [
    (["--group-size", "128"], ["group size 128 does not divide the 64 input features"]),
    (["--group-size", "48"], ["--group-size 48", "16, 32, 64, 128"]),
    (["--levels", "2", "5"], ["--levels", "2 3 4 8"]),
])
def test_bad_input_is_refused_before_loading(tiny_model_dir, tmp_path, args, phrases):
    run = tmp_path / "run"
    proc = cli("run", "--model", tiny_model_dir, "--backend", "gptq", *RUN, *args, "--run-dir", run,
               check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase.lower() in proc.stderr.lower(), proc.stderr[-2000:]
    assert "loading model" not in proc.stderr
    assert not run.exists()


def test_an_odd_shape_is_refused_with_the_reason(tiny_model_dir):
    from core.backends import get_backend
    from core.errors import UserError

    backend = get_backend("gptq", 16)
    backend.check((64, 64), 2, "a weight")
    with pytest.raises(UserError, match="48 output features are not a multiple of 32"):
        backend.check((48, 64), 2, "a weight")
    with pytest.raises(UserError, match="5-bit is not supported by gptq"):
        backend.check((64, 64), 5, "a weight")
