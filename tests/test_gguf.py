"""The gguf backend and export against llama.cpp itself (llama-cpp-python's bundled ggml
and llama_model_quantize): ggml's bytes and their GGUF sizes, llama.cpp's fallback types,
the importance matrix in llama-imatrix's format and its effect, and a run on a tiny
random Llama GGUF (widths multiples of 256, so K-quants apply) exported, read back with
gguf-py and run by llama.cpp; the embedded SmolLM2 (576-wide rows: fallbacks) quantized
by the simulation and by llama.cpp's quantize to the same bytes."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.backends.gguf import fallback_type, parse_types, tensor_nbytes
from core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python (the gguf extra) is not installed")


def cli(*args, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "impq_tui", *map(str, args)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


# ------------------------------------------------------------------ types (no llama.cpp needed)

def test_type_pair_is_parsed_and_refused_with_the_field_named():
    assert parse_types(None) == ("Q2_K", "Q4_K")
    assert parse_types("iq3_s, q5_k") == ("IQ3_S", "Q5_K")
    with pytest.raises(UserError, match="Q4_1"):
        parse_types("Q4_1,Q4_K")                       # not offered
    with pytest.raises(UserError, match="give the low one first"):
        parse_types("Q4_K,Q2_K")
    with pytest.raises(UserError, match="two GGUF types"):
        parse_types("Q2_K")
    # more levels (`levels`): one type each, K-quants by default
    assert parse_types(None, (2, 3, 4)) == ("Q2_K", "Q3_K", "Q4_K")
    assert parse_types("IQ2_S Q3_K Q6_K", (2, 3, 8)) == ("IQ2_S", "Q3_K", "Q6_K")
    with pytest.raises(UserError, match="3 GGUF types, one per level 2 3 4"):
        parse_types("Q2_K,Q4_K", (2, 3, 4))


def test_fallbacks_are_llama_cpps():
    # llama-quant.cpp's tensor_type_fallback: K-quants need rows of 256.
    assert fallback_type("Q2_K", 1536) == "Q2_K"
    assert fallback_type("Q2_K", 576) == "Q4_0"
    assert fallback_type("Q4_K", 576) == "Q5_0"
    assert fallback_type("Q5_K", 576) == "Q5_1"
    assert fallback_type("Q6_K", 576) == "Q8_0"
    assert fallback_type("IQ3_S", 576) == "IQ4_NL"
    assert fallback_type("Q8_0", 576) == "Q8_0"        # a 32-block type fits
    assert fallback_type("Q2_K", 100) == "F16"          # not even 32 divides the row
    assert tensor_nbytes("Q2_K", 10, 512) == 10 * 2 * 84
    assert tensor_nbytes("Q4_0", 3, 576) == 3 * 18 * 18


def test_gguf_types_flag_needs_the_gguf_backend(tmp_path):
    proc = cli("run", "--backend", "hqq", "--gguf-types", "Q2_K", "Q4_K", "--run-dir",
               tmp_path / "r", "--samples", 1, check=False)
    assert proc.returncode == 2 and "--gguf-types" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("run", "--backend", "gguf", "--gguf-types", "Q4_K", "Q2_K", "--run-dir",
               tmp_path / "r", "--samples", 1, check=False)
    assert proc.returncode == 2 and "low one first" in proc.stderr


# ------------------------------------------------------------------ ggml through ctypes

@needs_llama_cpp
def test_ggml_bytes_have_the_gguf_size_and_decode_like_gguf_py():
    import gguf

    from core.backends.gguf import ggml

    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 512)).astype(np.float32)
    errors = {}
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_XS", "IQ3_S", "Q4_0", "Q5_0"):
        data = ggml().quantize(name, W, None)
        assert data.nbytes == tensor_nbytes(name, 64, 512)
        back = ggml().dequantize(name, data, 512)
        # gguf-py's numpy decoder (a separate implementation) reads the same values
        assert np.array_equal(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]), back)
        errors[name] = np.linalg.norm(back - W) / np.linalg.norm(W)
    ladder = [errors[n] for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")]
    assert ladder == sorted(ladder, reverse=True) and ladder[0] < 0.4 and ladder[-1] < 0.01, errors


@needs_llama_cpp
def test_importance_matrix_changes_the_bytes_and_lowers_the_weighted_error():
    from core.backends.gguf import ggml

    rng = np.random.default_rng(1)
    W = rng.standard_normal((128, 512)).astype(np.float32)
    importance = np.ones(512, np.float32)
    importance[:32] = 100.0          # a few input features carry most of the activation energy
    plain, weighted = ggml().quantize("Q2_K", W, None), ggml().quantize("Q2_K", W, importance)
    assert not np.array_equal(plain, weighted)

    def weighted_error(data):
        return float((importance * (ggml().dequantize("Q2_K", data, 512) - W) ** 2).sum())

    assert weighted_error(weighted) < 0.9 * weighted_error(plain)


@needs_llama_cpp
def test_backend_on_a_tiny_model_with_and_without_fallbacks():
    from core.backends.gguf import GgufBackend, GgufLinear
    from core.models import from_config, tiny_config

    loaded = from_config(tiny_config(layers=1, hidden=64, intermediate=256, vocab=128, heads=4,
                                     kv_heads=2), torch.device("cpu"), torch.float32)
    backend = GgufBackend(types="Q3_K,Q5_K")
    backend.calibrate(loaded, torch.randint(0, 128, (2, 16)))
    down = loaded.model.get_submodule(loaded.linear_names[0][-1])      # rows of 256: Q3_K
    q = loaded.model.get_submodule(loaded.linear_names[0][0])          # rows of 64: fallback
    low, high = backend.quantize_linear(down, 2), backend.quantize_linear(q, 4)
    assert isinstance(low, GgufLinear) and (low.ggml_type, high.ggml_type) == ("Q3_K", "Q5_1")
    assert backend.module_nbytes(low) == tensor_nbytes("Q3_K", 64, 256)
    assert backend.module_nbytes(high) == tensor_nbytes("Q5_1", 64, 64)
    fallbacks = backend.fallbacks([(n, tuple(loaded.model.get_submodule(n).weight.shape))
                                   for n in loaded.linear_names[0]])
    assert loaded.linear_names[0][-1] not in fallbacks
    assert fallbacks[loaded.linear_names[0][0]] == {"Q3_K": "Q4_0", "Q5_K": "Q5_1"}


# ------------------------------------------------------------------ the importance matrix file

@needs_llama_cpp
def test_imatrix_file_is_llama_imatrix_format(tmp_path):
    import gguf

    from core import imatrix
    from core.models import from_config, tiny_config

    loaded = from_config(tiny_config(layers=2), torch.device("cpu"), torch.float32)
    windows = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(0))
    stats = imatrix.collect(loaded, windows, micro_batch=2)
    names = {n: f"blk.{i}.t{j}.weight" for i, layer in enumerate(loaded.linear_names)
             for j, n in enumerate(layer)}
    imatrix.write(tmp_path / "imatrix.gguf", stats, {n: (t, 0) for n, t in names.items()},
                  dataset="builtin", chunks=3, chunk_tokens=10)
    reader = gguf.GGUFReader(str(tmp_path / "imatrix.gguf"))
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["builtin"]
    assert reader.get_field("imatrix.chunk_count").contents() == 3
    assert reader.get_field("general.architecture") is None
    means = imatrix.read(tmp_path / "imatrix.gguf")
    first = loaded.linear_names[0][0]
    assert stats[first].count == 30
    np.testing.assert_allclose(means[names[first]], stats[first].mean, rtol=1e-6)
    # q, k and v read the same normed input
    assert np.array_equal(stats[loaded.linear_names[0][0]].sum2, stats[loaded.linear_names[0][1]].sum2)


# ------------------------------------------------------------------ a tiny random Llama as GGUF

def write_tiny_gguf(path: Path, layers: int = 2, hidden: int = 256, intermediate: int = 512,
                    heads: int = 4, kv_heads: int = 2, seed: int = 0,
                    checkpoint: Path | None = None) -> Path:
    """A Llama with random weights as an F32 GGUF that llama.cpp and transformers load:
    llama.cpp's tensor names and Q/K row order, the embedded SmolLM2's tokenizer (so its
    vocabulary), tied embeddings. `checkpoint`: also save it there as a Hugging Face
    checkpoint (what llama.cpp's converter would have turned into this GGUF)."""
    import gguf

    from core.models import _cached_embedded_gguf, _installed_embedded_gguf, from_config, tiny_config

    source = _installed_embedded_gguf() or _cached_embedded_gguf()
    reader = gguf.GGUFReader(str(source))
    vocab = len(reader.get_field("tokenizer.ggml.tokens").contents())
    config = tiny_config(layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab,
                         heads=heads, kv_heads=kv_heads)
    config.tie_word_embeddings = True
    model = from_config(config, torch.device("cpu"), torch.float32, seed=seed).model
    if checkpoint is not None:
        from transformers import AutoTokenizer

        from core.models import embedded_checkpoint

        model.save_pretrained(checkpoint)
        AutoTokenizer.from_pretrained(embedded_checkpoint()).save_pretrained(checkpoint)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None) else 10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:   # convert_hf_to_gguf's Q/K order
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, kv_heads)
        writer.add_tensor(name_map.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    if not HAS_LLAMA_CPP:
        pytest.skip("llama-cpp-python (the gguf extra) is not installed")
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def gguf_run(tiny_gguf, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-runs") / "run"
    cli("run", "--model", tiny_gguf, "--backend", "gguf", "--samples", 2, "--windows", 4,
        "--window-tokens", 32, "--device", "cpu", "--quiet", "--run-dir", path)
    return path


@needs_llama_cpp
def test_run_costs_are_the_gguf_sizes(gguf_run):
    from core.runs import RunDir

    run = RunDir.open(gguf_run)
    assert run.config.gguf_types == "Q2_K,Q4_K"
    costs = run.read_costs()
    # per layer: q,o (256x256), k,v (128x256), gate, up (512x256), down (256x512); all K-quant
    rows_by_len = {256: 256 + 128 + 128 + 256 + 512 + 512, 512: 256}
    for name, m in (("Q2_K", costs["m_lo"]), ("Q4_K", costs["m_hi"])):
        expected = sum(tensor_nbytes(name, rows, n) for n, rows in rows_by_len.items())
        assert m == [expected, expected]
    assert costs["types"]["low"] == "Q2_K" and costs["types"]["fallbacks"] == {}
    assert costs["types"]["imatrix"] is True


@needs_llama_cpp
def test_export_is_run_by_llama_cpp_with_the_allocated_types(gguf_run, tmp_path):
    import gguf

    from core.runs import RunDir

    out = tmp_path / "export"
    proc = cli("export", gguf_run, "--bits", 3, "--backend", "gguf", "--out", out,
               "--verify", "--eval-windows", 2, "--eval-window-tokens", 32, "--json")
    result = json.loads(proc.stdout)
    record = json.loads((out / "allocation.json").read_text())
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    stored = {t.name: t for t in reader.tensors}
    costs = RunDir.open(gguf_run).costs()
    q = [int(b == 2) for b in record["bits_per_layer"]]
    assert 0 < sum(q) < len(q)             # a budget of 3 bits mixes Q2_K and Q4_K layers
    for layer in record["layers"]:
        want = "Q4_K" if layer["bits"] == 4 else "Q2_K"
        tensors = [t for n, t in stored.items() if n.startswith(f"blk.{layer['index']}.")
                   and not n.endswith("norm.weight")]
        assert len(tensors) == 7 and {t.tensor_type.name for t in tensors} == {want}
        # bytes in the file = the run's costs for that type
        assert sum(int(t.n_bytes) for t in tensors) == layer["bytes"]
        assert layer["bytes"] == (costs.m_hi if layer["bits"] == 4 else costs.m_lo)[layer["index"]]
    assert record["quantization"]["types_by_tensor"] == {n: t.tensor_type.name for n, t in stored.items()}
    # tied embeddings, rows of 256: llama.cpp's Q4_K_M rules give the output's Q6_K
    assert stored["token_embd.weight"].tensor_type.name == "Q6_K"
    assert record["quantization"]["identical_tensors"] == 7 * len(q)
    # llama.cpp ran the file on the same tokens; the gap is the activation quantization
    assert result["ppl_reloaded"] is not None and result["ppl"] is not None
    assert abs(result["ppl_reloaded"] - result["ppl"]) / result["ppl"] < 0.05
    assert (out / "imatrix.gguf").is_file()
    readme = (out / "README.md").read_text()
    for phrase in ("llama-cli -m model.gguf", "llama-server", "ollama create", "Q2_K"):
        assert phrase in readme
    assert (out / "Modelfile").read_text() == "FROM ./model.gguf\n"


@needs_llama_cpp
def test_three_levels_export_three_types(tiny_gguf, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    cli("run", "--model", tiny_gguf, "--backend", "gguf", "--levels", 2, 3, 4, "--samples", 1,
        "--windows", 2, "--window-tokens", 16, "--device", "cpu", "--quiet", "--run-dir", run)
    costs = json.loads((run / "costs.json").read_text())
    assert costs["types"]["by_level"] == {"2": "Q2_K", "3": "Q3_K", "4": "Q4_K"}
    per_layer = {"Q2_K": costs["m_lo"][0], "Q3_K": costs["mid"][0][0], "Q4_K": costs["m_hi"][0]}
    rows_by_len = {256: 256 + 128 + 128 + 256 + 512 + 512, 512: 256}
    for name, m in per_layer.items():
        assert m == sum(tensor_nbytes(name, rows, n) for n, rows in rows_by_len.items())
    cli("export", run, "--bits", 3, "--backend", "gguf", "--out", out, "--eval-windows", 2,
        "--eval-window-tokens", 16)
    record = json.loads((out / "allocation.json").read_text())
    by_level = record["quantization"]["types_by_level"]
    stored = record["quantization"]["types_by_tensor"]
    for layer in record["layers"]:
        assert {t for n, t in stored.items() if n.startswith(f"blk.{layer['index']}.")
                and not n.endswith("norm.weight")} == {by_level[str(layer["bits"])]}


@needs_llama_cpp
def test_a_checkpoint_run_with_several_ggufs_is_refused_by_the_gguf_export(tiny_model_dir, tmp_path):
    """(A checkpoint with no GGUF is converted: tests/test_gguf_convert.py.)"""
    import shutil

    checkpoint = shutil.copytree(tiny_model_dir, tmp_path / "checkpoint")   # files get added below
    run = tmp_path / "run"
    cli("run", "--model", checkpoint, "--samples", 1, "--windows", 2, "--window-tokens", 16,
        "--device", "cpu", "--quiet", "--run-dir", run)
    for name in ("a.gguf", "b.gguf"):             # which conversion is meant?
        (checkpoint / name).write_bytes(b"GGUF")
    proc = cli("export", run, "--bits", 3, "--backend", "gguf", "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "several GGUF files" in proc.stderr, proc.stderr[-2000:]


@needs_llama_cpp
def test_a_checkpoint_run_exports_from_its_conversion_beside_it(tmp_path):
    """A run on a Hugging Face checkpoint exports from <folder>.gguf, the conversion beside
    the folder (as `convert_hf_to_gguf.py --outfile` writes it): the bytes are the run's."""
    checkpoint = tmp_path / "tiny-hf"
    write_tiny_gguf(tmp_path / "tiny-hf.gguf", checkpoint=checkpoint)
    run = tmp_path / "run"
    cli("run", "--model", checkpoint, "--backend", "gguf", "--gguf-types", "Q3_K", "Q5_K",
        "--samples", 1, "--windows", 2, "--window-tokens", 16, "--device", "cpu", "--quiet",
        "--run-dir", run)
    out = tmp_path / "export"
    cli("export", run, "--bits", 3, "--backend", "gguf", "--out", out, "--eval-windows", 2,
        "--eval-window-tokens", 16)
    record = json.loads((out / "allocation.json").read_text())
    assert record["quantization"]["source"] == str(tmp_path / "tiny-hf.gguf")
    assert record["quantization"]["identical_tensors"] == 14
    assert set(record["quantization"]["types_by_tensor"].values()) >= {"Q3_K", "Q5_K"}


# ------------------------------------------------------------------ the embedded model: fallbacks

@needs_llama_cpp
@pytest.mark.slow
def test_embedded_model_simulation_equals_llama_cpp_quantize(tmp_path):
    """SmolLM2's 576-wide rows fall back to Q4_0/Q5_0; its 1536-wide down projections keep
    Q2_K/Q4_K. The bytes the simulation made for layer 0 (low) and layer 1 (high) are the
    bytes llama.cpp's quantize writes for them, with the same importance matrix."""
    import gguf

    from core import imatrix
    from core.backends.gguf import GgufBackend
    from core.data import load_text, token_windows
    from core.export.gguf import gguf_input, quantize_file, tensor_names
    from core.models import load_model
    from core.runs import RunConfig

    loaded = load_model("embedded", torch.device("cpu"), torch.float32)
    windows = token_windows(load_text("builtin", "calibration"), loaded.tokenizer, 2, 64, 0)
    backend = GgufBackend()
    backend.calibrate(loaded, windows)
    source = gguf_input(RunConfig())
    names = tensor_names(source, loaded.linear_names)
    simulated = {}
    for layer, bits in ((0, 2), (1, 4)):
        for name in loaded.linear_names[layer]:
            module = backend.quantize_linear(loaded.model.get_submodule(name), bits)
            simulated[names[name]] = module
    by_type = {n: m.ggml_type for n, m in simulated.items()}
    assert by_type["blk.0.attn_q.weight"] == "Q4_0" and by_type["blk.0.ffn_down.weight"] == "Q2_K"
    assert by_type["blk.1.ffn_up.weight"] == "Q5_0" and by_type["blk.1.ffn_down.weight"] == "Q4_K"

    imatrix.write(tmp_path / "imatrix.gguf", backend.imatrix_stats,
                  {n: (t, 0) for n, t in names.items()}, dataset="builtin", chunks=2, chunk_tokens=64)
    asked = {n: ("Q2_K" if n.startswith("blk.0.") else "Q4_K") for n in simulated}
    steps = []
    quantize_file(source, tmp_path / "out.gguf", asked, tmp_path / "imatrix.gguf",
                  progress=lambda k, n, what: steps.append((k, n, what)))
    stored = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    # its progress: read from llama.cpp's log, up to the last of the source's tensors
    n = len(gguf.GGUFReader(str(source)).tensors)
    assert steps[0] == (0, 1, "llama.cpp quantize") and steps[-1] == (n, n, "llama.cpp quantize")
    at = [k for k, total, _ in steps if (k, total) != (0, 1)]
    assert {total for k, total, _ in steps if k} == {n} and at == sorted(at)
    for name, module in simulated.items():
        t = stored[name]
        assert t.tensor_type.name == module.ggml_type
        assert int(t.n_bytes) == module.data.nbytes
        rows = lambda a: np.sort(np.ascontiguousarray(a).view(f"V{a.shape[1]}").ravel())  # noqa: E731
        assert np.array_equal(rows(np.asarray(t.data)), rows(module.data)), name


# ------------------------------------------------------------------ the form

@needs_llama_cpp
def test_form_offers_gguf_with_its_type_pair(tmp_path):
    import asyncio

    from textual.widgets import Select

    from impq_tui.app import ImpqApp
    from impq_tui.screens.setup import SetupDefaults, SetupScreen

    async def scenario():
        setup = SetupDefaults(model="embedded", samples=2, windows=4, window_tokens=32,
                              device="cpu", run_dir=str(tmp_path / "r"))
        app = ImpqApp(setup=setup, cursor_blink=False)
        async with app.run_test(size=(100, 30)) as pilot:
            form = app.screen
            assert isinstance(form, SetupScreen)
            types = form.query_one("#gguf_types")
            assert not types.display                     # quanto: no pair to pick
            form.query_one("#backend", Select).value = "gguf"
            await pilot.pause()
            assert types.display and types.value == "Q2_K,Q4_K"
            types.value = "q4_k,q2_k"
            await pilot.press("f5")
            assert isinstance(app.screen, SetupScreen)
            message = str(form.query_one("#setup-message").render())
            assert "GGUF types" in message and "low one first" in message and "--" not in message
            types.value = "iq3_s q5_k"
            config = form.config()
            assert (config.backend, config.gguf_types) == ("gguf", "IQ3_S,Q5_K")
            form.query_one("#backend", Select).value = "hqq"
            await pilot.pause()
            assert not types.display and form.config().gguf_types == ""

    asyncio.run(scenario())
