"""Any decoder-only causal LM, by structure (core.models): tiny random-config models of the
families transformers 5 ships, end to end (run, solve, eval, export with quanto and HQQ;
GPTQ on Gemma 3), the gguf export's check that it converts a checkpoint of each family (and
its refusal of one llama.cpp would run differently), and clear refusals, decided from the
config before any weight is read.

Which (family, backend) pairs are tested where: quanto and HQQ here (and
tests/test_moe.py for Qwen3-MoE, Mixtral); GPTQ here (Gemma 3), tests/test_gptq_spqe.py
(Llama), tests/test_moe.py (Qwen3-MoE); gguf on checkpoints in tests/test_gguf_convert.py
(Llama, Qwen2/3, Qwen3-MoE converted; the whole export on Llama) and
tests/test_gguf_convert_families.py (the other families; the whole export on Phi-3), on GGUF inputs in
tests/test_gguf.py (Llama) and tests/test_gguf_inputs.py (Gemma 3, Phi-3)."""
from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from core.engine import run_spqe
from core.errors import UserError
from core.evaluate import allocate, evaluate_allocation
from core.export import export_model
from core.models import from_config, load_model, tiny_config
from core.runs import RunConfig, RunDir
from test_gguf_convert import config_only

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
            "granite", "starcoder2", "gpt_neox", "stablelm"]
EVAL = {"windows": 2, "window_tokens": 32}


def save_family(path, tokenizer, model_type: str, layers: int = 2, **changes):
    config = tiny_config(model_type, layers=layers, vocab=len(tokenizer))
    for key, value in changes.items():
        setattr(config, key, value)
    loaded = from_config(config, torch.device("cpu"), torch.float32, seed=1)
    loaded.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_runs_end_to_end(family, tiny_tokenizer, tmp_path):
    model = save_family(tmp_path / family, tiny_tokenizer, family)
    config = RunConfig(model=str(model), samples=2, windows=2, window_tokens=32, device="cpu",
                       group_size=32, micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    run = RunDir.open(run.path)
    assert run.D().shape == (2, 2)
    alloc = allocate(run, bits=3.0)
    assert alloc.bytes <= alloc.budget_bytes
    bits = list(alloc.bits_per_layer)
    for backend in ("quanto", "hqq"):
        measured = evaluate_allocation(run, bits, backend=backend, **EVAL)
        assert measured.ppl == pytest.approx(measured.ppl_simulated, rel=1e-3)
        exported = export_model(run, bits, backend, str(tmp_path / f"out-{backend}"), evaluate=True,
                                eval_windows=EVAL["windows"], eval_window_tokens=EVAL["window_tokens"])
        assert exported.ppl == pytest.approx(measured.ppl, rel=1e-5)
        record = json.loads((tmp_path / f"out-{backend}" / "allocation.json").read_text())
        assert [layer["bits"] for layer in record["layers"]] == bits


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="GPTQModel is not installed (pip install 'impq-tui[gptq]')")
def test_gemma3_runs_end_to_end_with_gptq(tiny_tokenizer, tmp_path):
    """GPTQ's Hessians come from each layer run on its recorded inputs and keyword
    arguments: Gemma 3's sliding and global layers take different masks and rotary
    embeddings (a window of 8 tokens in 32, the sixth layer global). The real GPTQModel
    modules compute what SPQE simulated; the export writes each layer's bits."""
    from core.export import ROUND_TRIP_RTOL

    model = save_family(tmp_path / "gemma3", tiny_tokenizer, "gemma3_text", layers=6, head_dim=16,
                        sliding_window=8)
    config = RunConfig(model=str(model), backend="gptq", samples=1, windows=2, window_tokens=32,
                       device="cpu", group_size=32, micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    run = RunDir.open(run.path)
    bits = [4, 2, 2, 2, 2, 4]
    measured = evaluate_allocation(run, bits, backend="gptq", **EVAL)
    assert measured.ppl == pytest.approx(measured.ppl_simulated, rel=ROUND_TRIP_RTOL["float16"])
    assert measured.ppl != pytest.approx(measured.ppl_original, rel=1e-6)
    export_model(run, bits, "gptq", str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "allocation.json").read_text())
    assert [layer["bits"] for layer in record["layers"]] == bits
    assert [layer["bytes"] for layer in record["layers"]] == [
        (run.costs().m_hi if b == 4 else run.costs().m_lo)[i] for i, b in enumerate(bits)]


def gptq_run_and_measure(model, tmp_path, bits=(4, 2)) -> tuple[RunDir, list[int]]:
    """A 1-sample GPTQ run of the 2-layer checkpoint `model`; the real GPTQModel modules of
    the allocation `bits` compute what SPQE simulated. (the run, the allocation)"""
    from core.export import ROUND_TRIP_RTOL

    config = RunConfig(model=str(model), backend="gptq", samples=1, windows=2, window_tokens=32,
                       device="cpu", group_size=32, micro_batch=2)
    run = RunDir.create(tmp_path / "run", config)
    assert run_spqe(config, run) == "completed"
    run = RunDir.open(run.path)
    measured = evaluate_allocation(run, list(bits), backend="gptq", **EVAL)
    assert measured.ppl == pytest.approx(measured.ppl_simulated, rel=ROUND_TRIP_RTOL["float16"])
    return run, list(bits)


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                    reason="GPTQModel is not installed (pip install 'impq-tui[gptq]')")
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3_text"])   # gemma3: above
def test_a_family_runs_end_to_end_with_gptq(family, tiny_tokenizer, tmp_path):
    """GPTQ measured by SPQE on every family: the run, an allocation, GPTQModel's real
    modules computing what SPQE simulated, and an export holding each layer's bits and the
    run's bytes."""
    model = save_family(tmp_path / family, tiny_tokenizer, family)
    run, bits = gptq_run_and_measure(model, tmp_path)
    export_model(run, bits, "gptq", str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "allocation.json").read_text())
    assert [layer["bits"] for layer in record["layers"]] == bits
    assert [layer["bytes"] for layer in record["layers"]] == [run.costs().m_hi[0], run.costs().m_lo[1]]


# What the gguf export converts beyond the tiny configs' defaults: Gemma's attention scale
# as llama.cpp computes it, Gemma 2's soft caps and window with its tied head.
GGUF_READY = {"gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                         "tie_word_embeddings": True},
              "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16}}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_export_converts_a_checkpoint_of_each_family(family, tiny_tokenizer, tmp_path):
    """Every family here converts to GGUF (core.export.gguf_convert; llama.cpp's losses are
    checked in tests/test_gguf_convert_families.py): the check before a gguf run passes from
    the config and says where the conversion will be written, without writing it."""
    from core.export.gguf import gguf_input

    # llama.cpp looks up Phi-3's special tokens in a model whose name says phi3 (the byte-level
    # tiny tokenizer has none; the converter refuses that: tests/test_gguf_convert.py)
    folder = save_family(tmp_path / family.replace("phi3", "phi"), tiny_tokenizer, family,
                         **GGUF_READY.get(family, {}))
    target = gguf_input(RunConfig(model=str(folder), backend="gguf"), convert=False)
    assert target.suffix == ".gguf" and not target.exists()
    assert not list(folder.glob("*.gguf"))


@pytest.mark.parametrize("model_type, words", [
    # mixture of experts whose fused experts defuser cannot split (and a dense first layer:
    # every layer is looked at); Qwen3-MoE, Mixtral... work (tests/test_moe.py)
    ("afmoe", "fused 3-D tensors.*does not handle model type 'afmoe'"),
    ("gpt2", "Conv1D"),
    ("bert", "decoder-only"),         # an encoder with an LM head: no final norm after its layers
    ("t5", "not a causal language model"),
])
def test_unsupported_models_are_refused_from_their_config(model_type, words, tmp_path):
    """No weights exist in these folders: a refusal proves nothing was read."""
    folder = config_only(tmp_path / model_type, model_type)
    start = time.monotonic()
    with pytest.raises(UserError, match=words):
        load_model(str(folder), torch.device("cpu"))
    assert time.monotonic() - start < 10


def test_the_backends_rules_are_checked_before_loading(tiny_tokenizer, tmp_path):
    """A group size that does not divide a layer's inputs is refused from the config,
    before the weights load (a folder with no weights shows it)."""
    from core.backends import get_backend
    from core.engine import check_before_loading

    folder = config_only(tmp_path / "llama", "llama")
    config = RunConfig(model=str(folder), group_size=48, device="cpu")
    with pytest.raises(UserError, match="does not divide"):
        check_before_loading(config, get_backend("quanto", 48))
    check_before_loading(RunConfig(model=str(folder), group_size=32), get_backend("hqq", 32))


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs the gguf extra")
def test_a_gguf_run_on_a_checkpoint_the_export_cannot_convert_is_refused_before_loading(
        tiny_tokenizer, tmp_path):
    """A gguf run is measured for a GGUF export: on a Gemma 2 checkpoint with an output head of
    its own (which llama.cpp's gemma2 does not have) the run is refused from the config, with
    llama.cpp's converter command, instead of after hours of SPQE; once the user's conversion
    lies beside the folder, the same check passes. A convertible Llama checkpoint passes as it is."""
    from core.backends import get_backend
    from core.engine import check_before_loading

    folder = save_family(tmp_path / "gemma2", tiny_tokenizer, "gemma2", **{
        **GGUF_READY["gemma2"], "tie_word_embeddings": False})
    config = RunConfig(model=str(folder), backend="gguf", group_size=32, device="cpu")
    backend = get_backend("gguf", 32)
    with pytest.raises(UserError, match="convert_hf_to_gguf.py") as info:
        check_before_loading(config, backend)
    assert "gemma2" in str(info.value) and "output head of its own" in str(info.value)
    (tmp_path / "gemma2.gguf").write_bytes(b"GGUF")     # where the converter's output goes
    check_before_loading(config, backend)
    llama = save_family(tmp_path / "llama", tiny_tokenizer, "llama")
    check_before_loading(RunConfig(model=str(llama), backend="gguf", group_size=32), backend)


def test_random_weights_do_not_depend_on_other_threads():
    """from_config's weights come from its seed alone, and it leaves the caller's global
    generator as it was: the setup form's estimate probe builds random models in a worker,
    and a checkpoint built beside it (a test's) once got other weights (a CI failure)."""
    import threading

    from core.models import seeded

    config = tiny_config("llama", layers=2)
    expected = from_config(config, torch.device("cpu"), torch.float32, seed=3).model.state_dict()
    torch.manual_seed(11)
    before = torch.rand(4)
    torch.manual_seed(11)
    from_config(config, torch.device("cpu"), torch.float32, seed=5)
    assert torch.equal(torch.rand(4), before)

    stop = threading.Event()

    def probe_like():
        while not stop.is_set():
            from_config(config, torch.device("cpu"), torch.float32, seed=7)

    worker = threading.Thread(target=probe_like)
    worker.start()
    try:
        for _ in range(20):
            got = from_config(config, torch.device("cpu"), torch.float32, seed=3).model.state_dict()
            assert all(torch.equal(got[k], expected[k]) for k in expected)
            with seeded(3):
                again = torch.rand(1000)
            with seeded(3):
                assert torch.equal(torch.rand(1000), again)
    finally:
        stop.set()
        worker.join()
