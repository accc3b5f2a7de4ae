"""GPTQ with more than two levels (issue 18): `run --backend gptq --levels 2 3 4` on a real
tiny checkpoint, then `export --backend gptq` of an allocation that mixes 2-, 3- and 4-bit
layers. GPTQModel's per-module `dynamic` bit-widths in config.json name every layer that
is not at the base width, each layer's tensors in the file have its level's bytes (the
run's costs at that level) and shapes, and GPTQModel loads it back (--verify). Skipped
without GPTQModel."""
from __future__ import annotations

import importlib.util
import json
import re

import pytest

from core.runs import RunDir
from tests.test_gptq_spqe import EVAL, _stored, cli

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                reason="GPTQModel is not installed (pip install 'impq-tui[gptq]')")

LEVELS = (2, 3, 4)
RUN = ["--samples", "2", "--windows", "4", "--window-tokens", "32", "--device", "cpu", "--quiet"]


def test_three_gptq_levels_run_solve_and_export_with_dynamic_bits(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    cli("run", "--model", tiny_model_dir, "--backend", "gptq", "--levels", *LEVELS, *RUN,
        "--run-dir", run_dir)
    run = RunDir.open(run_dir)
    costs = run.costs()
    assert costs.levels == LEVELS and run.D().shape == (2, 2 * costs.L)
    assert all(lo < mid < hi for lo, mid, hi in zip(*costs.sizes))

    # a budget between the levels: find one whose optimum uses at least two of them
    for bits in ("2.5", "3.0", "3.5", "2.75", "3.25"):
        alloc = json.loads(cli("solve", run_dir, "--bits", bits, "--json").stdout)
        if len(set(alloc["bits_per_layer"])) >= 2 and 3 in alloc["bits_per_layer"]:
            break
    else:
        pytest.fail(f"no budget gave a mix with 3-bit layers: {alloc['bits_per_layer']}")
    assert alloc["bytes"] == costs.bytes_of(alloc["bits_per_layer"]) <= alloc["budget_bytes"]

    out = tmp_path / "export"
    proc = cli("export", run_dir, "--bits", bits, "--backend", "gptq", "--out", out, "--verify",
               "--json", *EVAL)
    result = json.loads(proc.stdout)
    assert result["bits_per_layer"] == alloc["bits_per_layer"]
    record = json.loads((out / "allocation.json").read_text())
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    base, dynamic = qcfg["bits"], qcfg.get("dynamic") or {}
    stored = _stored(out)
    index = {b: k for k, b in enumerate(LEVELS)}
    for layer in record["layers"]:
        i, bits_i = layer["index"], layer["bits"]
        assert bits_i == alloc["bits_per_layer"][i]
        in_file = sum(stored[f"{name}.{part}"].numel() * stored[f"{name}.{part}"].element_size()
                      for name in layer["modules"] for part in ("qweight", "qzeros", "scales", "g_idx"))
        assert in_file == layer["bytes"] == costs.sizes[index[bits_i]][i]
        for name in layer["modules"]:
            # GPTQModel packs 32 // bits values per int32 row... for 3 bits, 32 rows of 3 bits
            # span 3 int32 rows: rows = in_features * bits / 32 either way
            assert stored[f"{name}.qweight"].shape[0] == stored[f"{name}.g_idx"].numel() * bits_i // 32
            # the module's bit-width as GPTQModel's dynamic rules give it
            hits = [v for k, v in dynamic.items() if k.startswith("+:") and re.match(k[2:], name)]
            expected = hits[0].get("bits", base) if hits else base
            assert expected == bits_i, (name, bits_i, dynamic)
    assert result["bytes"] == costs.bytes_of(result["bits_per_layer"])
