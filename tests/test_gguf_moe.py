"""Mixture-of-experts models through the gguf backend and export: a gguf run on a tiny
Qwen3-MoE checkpoint and on a tiny Mixtral one (llama.cpp's llama architecture, its
experts in the hub layout w1/w2/w3; widths 256, so K-quants apply; each layer's four
experts at the layer's precision) exported with `export --backend gguf`. The checkpoint is
converted with its experts stacked (blk.N.ffn_gate_exps/ffn_up_exps/ffn_down_exps), one
type override per stacked tensor; the run's byte costs are the sizes of the written
tensors, every expert's slice of its stack holds the bytes the simulation quantized, the
importance matrix keeps one row and one token count per expert (as llama-imatrix writes
it), and llama.cpp runs the file at the simulated perplexity. The conversion and llama.cpp's
quantize report their tensors on the export's progress, and stop when the export is
cancelled. An expert that no calibration token reaches gets count 0 in the importance
matrix, taken as ones by the simulation and by llama.cpp alike."""
from __future__ import annotations

import importlib.util
import json
import threading

import numpy as np
import pytest

from core import events
from core.errors import Cancelled
from test_gguf_convert import save_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python (the gguf extra) is not installed")
EXPERTS, WIDTH = 4, 256
STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(scope="module")
def moe_runs(tiny_tokenizer, tmp_path_factory):
    """model_type -> (the run directory, the checkpoint), made on first use: 2 layers,
    attention 256 wide (4 heads of 64), four experts of 256 (Qwen3-MoE's
    moe_intermediate_size, Mixtral's intermediate_size), two chosen per token; one SPQE
    sample with the gguf backend."""
    from core.engine import run_spqe
    from core.runs import RunConfig, RunDir

    runs = {}

    def run_of(model_type: str):
        if model_type not in runs:
            base = tmp_path_factory.mktemp(f"gguf-{model_type}")
            experts = {"moe_intermediate_size": WIDTH} if model_type == "qwen3_moe" else {}
            checkpoint = save_checkpoint(base / "tiny-moe", tiny_tokenizer, model_type,
                                         shape={"hidden": WIDTH, "intermediate": WIDTH}, **experts)
            config = RunConfig(model=str(checkpoint), backend="gguf", gguf_types="Q2_K,Q4_K",
                               samples=1, windows=2, window_tokens=16, device="cpu")
            run = RunDir.create(base / "run", config)
            assert run_spqe(config, run) == "completed"
            runs[model_type] = run.path, checkpoint
        return runs[model_type]
    return run_of


@pytest.fixture(scope="module")
def moe_run(moe_runs):
    """The Qwen3-MoE run."""
    return moe_runs("qwen3_moe")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_moe_gguf_export_has_the_runs_bytes_and_runs_in_llama_cpp(model_type, moe_runs, tmp_path,
                                                                    monkeypatch):
    import gguf

    from core import imatrix
    from core.export import export_model
    from core.runs import RunDir

    run_dir, _ = moe_runs(model_type)
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))
    seen: list = []
    out = tmp_path / "export"
    run = RunDir.open(run_dir)
    result = export_model(run, [4, 2], "gguf", str(out), verify=True, eval_windows=2,
                          eval_window_tokens=32, callback=seen.append)
    stored = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    costs = run.costs()
    record = json.loads((out / "allocation.json").read_text())
    for layer, (bits, want) in enumerate(((4, "Q4_K"), (2, "Q2_K"))):
        linears = {n: t for n, t in stored.items() if n.startswith(f"blk.{layer}.")
                   and not n.endswith("norm.weight") and "ffn_gate_inp" not in n}
        assert sorted(linears) == sorted(f"blk.{layer}.{n}.weight" for n in
                                         ("attn_q", "attn_k", "attn_v", "attn_output") + STACKS)
        assert {t.tensor_type.name for t in linears.values()} == {want}
        for stack in STACKS:     # ggml order: in, out, experts
            assert list(stored[f"blk.{layer}.{stack}.weight"].shape) == [WIDTH, WIDTH, EXPERTS]
        # the run's byte cost of the layer is what its tensors take in the file
        file_bytes = sum(int(t.n_bytes) for t in linears.values())
        assert file_bytes == (costs.m_hi if bits == 4 else costs.m_lo)[layer]
        assert record["layers"][layer]["bytes"] == file_bytes
        assert sum(".experts." in m for m in record["layers"][layer]["modules"]) == 3 * EXPERTS
    assert stored["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"     # the router: not quantized
    assert record["quantization"]["identical_tensors"] == 2 * (4 + 3 * EXPERTS)   # every expert's slice
    assert result.bytes == sum(costs.m_hi[:1]) + sum(costs.m_lo[1:])

    # the importance matrix: one row and one token count per expert, as llama-imatrix writes
    # MUL_MAT_ID weights; each expert saw the tokens routed to it (two experts per token)
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out / "imatrix.gguf")).tensors}
    counts = tensors["blk.0.ffn_up_exps.weight.counts"].reshape(-1)
    assert tensors["blk.0.ffn_up_exps.weight.in_sum2"].shape == (EXPERTS, WIDTH)
    assert counts.sum() == 2 * 2 * 16 and len(set(counts.tolist())) > 1
    sums = tensors["blk.0.ffn_up_exps.weight.in_sum2"]
    means = imatrix.read(out / "imatrix.gguf")["blk.0.ffn_up_exps.weight"]     # what quantize takes
    assert np.array_equal(means, (sums / counts[:, None]).astype(np.float32).reshape(-1))

    # llama.cpp ran the file on the evaluation tokens (verify), at the simulated perplexity
    assert result.ppl_reloaded is not None
    assert abs(result.ppl_reloaded - result.ppl) / result.ppl < 0.02, (result.ppl, result.ppl_reloaded)

    # the conversion's progress: a step per tensor, and log lines
    steps = [e for e in seen if isinstance(e, events.Step) and e.what == "converting to GGUF"]
    n = len(gguf.GGUFReader(str(next((tmp_path / "cache").rglob("*.gguf")))).tensors)
    assert [s.done for s in steps] == list(range(1, n + 1)) and {s.total for s in steps} == {n}
    logs = [e.message for e in seen if isinstance(e, events.Log)]
    assert f"converting to GGUF: tensor {n} of {n} (blk.1.ffn_up_exps.weight)" in logs
    # llama.cpp's quantize: its tensors as its log counts them, up to the last
    quantizing = [(s.done, s.total) for s in seen if isinstance(s, events.Step)
                  and s.what == "llama.cpp quantize"]
    assert quantizing[0] == (0, 1) and quantizing[-1] == (n, n)
    assert len(set(quantizing)) == len(quantizing)      # each reported once


def _cancelled_export(moe_run, tmp_path, monkeypatch, step: str, at: int | None) -> list:
    """Export the MoE run with Esc pressed when `step` reports `at` done (None: its first
    report); the export must raise Cancelled and leave no folder. The `step` events seen."""
    from core.export import export_model
    from core.runs import RunDir

    run_dir, _ = moe_run
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))
    cancel = threading.Event()
    seen: list = []

    def callback(event):
        seen.append(event)
        if isinstance(event, events.Step) and event.what == step and at in (None, event.done):
            cancel.set()         # the user pressed Esc

    out = tmp_path / "export"
    with pytest.raises(Cancelled):
        export_model(RunDir.open(run_dir), [4, 2], "gguf", str(out), callback=callback, cancel=cancel)
    assert not out.exists() and not list(tmp_path.glob(".export*"))
    return [e for e in seen if isinstance(e, events.Step) and e.what == step]


def test_a_cancelled_export_stops_the_conversion_between_tensors(moe_run, tmp_path, monkeypatch):
    converting = _cancelled_export(moe_run, tmp_path, monkeypatch, "converting to GGUF", at=3)
    assert [e.done for e in converting] == [1, 2, 3]        # the check after tensor 4 stopped it
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]   # no partial conversion


def test_a_cancelled_export_stops_llama_cpps_quantize(moe_run, tmp_path, monkeypatch):
    quantizing = _cancelled_export(moe_run, tmp_path, monkeypatch, "llama.cpp quantize", at=None)
    assert [(s.done, s.total) for s in quantizing] == [(0, 1)]     # the next look stopped it


# ------------------------------------------------------------------ an expert no token reaches

def test_an_expert_without_calibration_tokens_gets_ones_as_llama_cpp_gives_it(tiny_tokenizer,
                                                                              tmp_path, monkeypatch):
    """Eight experts, one chosen per token, four calibration tokens: at least four experts
    of each layer see no token. The run goes through, their importance-matrix rows hold
    zero sums and count 0, both the simulation and llama.cpp's quantize take them as ones
    (common/imatrix-loader), so every expert's slice of the export holds the simulated bytes."""
    import gguf

    from core import imatrix
    from core.engine import run_spqe
    from core.export import export_model
    from core.runs import RunConfig, RunDir

    experts, tokens = 8, 4
    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))
    checkpoint = save_checkpoint(tmp_path / "tiny-moe", tiny_tokenizer, "qwen3_moe",
                                 shape={"hidden": WIDTH, "intermediate": WIDTH},
                                 moe_intermediate_size=WIDTH, num_experts=experts,
                                 num_experts_per_tok=1)
    config = RunConfig(model=str(checkpoint), backend="gguf", gguf_types="Q2_K,Q4_K", samples=1,
                       windows=1, window_tokens=tokens, device="cpu")
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"

    out = tmp_path / "export"
    export_model(RunDir.open(run.path), [4, 2], "gguf", str(out))
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out / "imatrix.gguf")).tensors}
    means = imatrix.read(out / "imatrix.gguf")
    for layer in range(2):
        for stack in STACKS:
            name = f"blk.{layer}.{stack}.weight"
            counts, sums = tensors[name + ".counts"].reshape(-1), tensors[name + ".in_sum2"]
            assert counts.shape == (experts,) and counts.sum() == tokens
            unrouted = counts == 0
            assert unrouted.sum() >= experts - tokens
            assert not sums[unrouted].any() and sums[~unrouted].all()
            rows = means[name].reshape(experts, -1)
            assert (rows[unrouted] == 1).all() and not (rows[~unrouted] == 1).all()
    record = json.loads((out / "allocation.json").read_text())
    assert record["quantization"]["identical_tensors"] == 2 * (4 + 3 * experts)
