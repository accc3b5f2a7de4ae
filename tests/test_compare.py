"""`impq-tui compare` on a real tiny run: every method at the same memory, all evaluated on
the same tokens with the real backend's modules, the JSON schema, files and errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from test_cli import ENV, ROOT, TINY_RUN, cli

from core.backends import get_backend
from core.compare import (
    METHODS,
    UNIFORM_HIGH,
    UNIFORM_LOW,
    calibration_windows,
    compare,
    tokens_sha256,
)
from core.data import eval_tokens
from core.export import get_exporter
from core.models import load_model
from core.runs import RunDir
from core.settings import eval_settings
from core.solver import Costs, budget_bytes
from core.switching import perplexity
from impq_tui.report import compare_rows, format_ppl

BITS = [2.25, 2.5, 3.0, 3.5]
EVAL = {"windows": 3, "window_tokens": 32}


def eval_windows(loaded, run):
    """The evaluation windows compare measures with EVAL (core.settings' one path)."""
    settings = eval_settings(run.config, torch.device("cpu"), **EVAL)
    return eval_tokens(loaded.tokenizer, settings)


def compare_cli(*args, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "impq_tui", "compare", *map(str, args)], env=ENV,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("compare") / "run"
    cli("run", "--model", tiny_model_dir, "--samples", 3, "--run-dir", path, *TINY_RUN, check=True)
    return RunDir.open(path)


@pytest.fixture(scope="module")
def result(tiny_run):
    return compare(tiny_run, BITS, **EVAL)


def test_every_method_meets_the_same_budget(result, tiny_run):
    costs = tiny_run.costs()
    assert len(result.results) == len(BITS) * len(METHODS) + 2
    for b in BITS:
        rows = [result.row(m, b) for m in METHODS]
        assert {r.budget_bytes for r in rows} == {budget_bytes(costs, b)}
        for r in rows:
            assert r.bytes <= r.budget_bytes
            assert r.bytes == costs.bytes_used([x == 2 for x in r.bits_per_layer])
            assert r.avg_bits == pytest.approx(8 * r.bytes / sum(costs.params))
            assert r.layers_high == r.bits_per_layer.count(4)
    low, high = result.row(UNIFORM_LOW, 2.0), result.row(UNIFORM_HIGH, 4.0)
    assert low.bits_per_layer == (2,) * 4 and low.bytes == costs.B_lo
    assert high.bits_per_layer == (4,) * 4 and high.bytes == costs.B_hi
    assert result.costs_source == "run"


def test_all_methods_are_evaluated_on_identical_tokens(result, tiny_run, tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"))
    tokens = eval_windows(loaded, tiny_run)
    assert {r.eval_tokens_sha256 for r in result.results} == {tokens_sha256(tokens)}
    assert {r.eval_tokens for r in result.results} == {3 * 31}
    assert result.eval["tokens"] == 3 * 31 and result.eval["tokens_sha256"] == tokens_sha256(tokens)
    # the evaluation half of the builtin text, not the calibration windows
    calib = calibration_windows(loaded, tiny_run.config)
    assert tokens_sha256(calib) != tokens_sha256(tokens)


def test_swapped_modules_give_the_perplexity_of_a_freshly_quantized_model(result, tiny_run, tiny_model_dir):
    """Assembling allocations by swapping prebuilt modules, evaluated in prefix-cached
    order, must equal quantizing a fresh model and running its full forward."""
    for method, b in (("impq", 2.5), ("lim", 3.0), (UNIFORM_HIGH, 4.0)):
        row = result.row(method, b)
        loaded = load_model(str(tiny_model_dir), torch.device("cpu"))
        tokens = eval_windows(loaded, tiny_run)
        loaded = get_exporter("quanto").quantize(loaded, list(row.bits_per_layer), tiny_run.config,
                                                 lambda message: None)
        assert row.ppl == pytest.approx(perplexity(loaded, tokens, 8), rel=1e-5)
        assert row.nll == pytest.approx(math.log(row.ppl))


def test_impq_row_is_the_runs_own_allocation(result, tiny_run):
    from core.evaluate import allocate

    for b in BITS:
        assert result.row("impq", b).bits_per_layer == allocate(tiny_run, bits=b).bits_per_layer


def test_other_backend_budgets_in_its_own_bytes(tiny_run, tiny_model_dir):
    other = compare(tiny_run, [2.5], backend="hqq", save=False, **EVAL)
    assert other.backend == "hqq" and other.costs_source == "measured"
    assert other.files == ()
    hqq = get_backend("hqq")
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"))
    modules = dict(loaded.model.named_modules())
    m_lo, m_hi = ([sum(hqq.quantize_weight(modules[n].weight.data, bits).nbytes for n in layer)
                   for layer in loaded.linear_names] for bits in (2, 4))
    costs = Costs(m_lo=m_lo, m_hi=m_hi, params=tiny_run.costs().params)
    assert {other.row(m, 2.5).budget_bytes for m in METHODS} == {budget_bytes(costs, 2.5)}
    assert all(r.bytes <= r.budget_bytes for r in other.results)


def test_compare_json_schema_and_files(tiny_run):
    proc = compare_cli(tiny_run.path, "--bits", "2.5", "3", "--json", "--quiet",
                       "--eval-windows", 2, "--eval-window-tokens", 32, check=True)
    out = json.loads(proc.stdout)
    assert {"results", "bits", "ppl_original", "impq_vs_best_baseline", "scores", "eval",
            "calib", "backend", "samples", "files", "impq_local_vs_best_baseline"} <= set(out)
    assert [v["target_bits"] for v in out["impq_local_vs_best_baseline"]] == [2.5, 3.0]
    assert out["bits"] == [2.5, 3.0] and out["samples"] == 3
    rows = out["results"]
    assert len(rows) == 2 * len(METHODS) + 2
    assert {(r["method"], r["target_bits"]) for r in rows} == (
        {(m, b) for m in METHODS for b in (2.5, 3.0)} | {(UNIFORM_LOW, 2.0), (UNIFORM_HIGH, 4.0)})
    for r in rows:
        assert {"method", "target_bits", "avg_bits", "weight_bits", "ppl", "bytes",
                "budget_bytes", "bits_per_layer", "eval_tokens", "eval_tokens_sha256"} <= set(r)
        assert r["ppl"] > 1 and r["bytes"] <= r["budget_bytes"]
        assert r["eval_tokens"] == 2 * 31 and r["eval_tokens_sha256"] == out["eval"]["tokens_sha256"]
    assert set(out["scores"]) == {"sensitivity", "lim", "zscore", "activation"}
    assert all(len(v) == 4 for v in out["scores"].values())
    saved = tiny_run.path / "compare" / "quanto.json"
    assert json.loads(saved.read_text()) == out
    for suffix in (".png", ".svg"):
        path = saved.with_suffix(suffix)
        assert str(path) in out["files"] and path.stat().st_size > 1000


def test_table_has_every_method_and_budget(result):
    headers, rows = compare_rows(result)
    assert headers == ["method", "2.25 bits", "2.5 bits", "3 bits", "3.5 bits"]
    assert [r[0] for r in rows[:8]] == ["IMPQ", "IMPQ-local", "IMPQ-fit", "IMPQ-fit, checked",
                                        "Sensitivity", "LIM", "Z-score", "Activation"]
    assert [r[0] for r in rows[8:12]] == ["IMPQ / best baseline", "IMPQ-local / best baseline",
                                          "IMPQ-fit / best baseline", "IMPQ-fit, checked / best baseline"]
    assert all(len(r) == len(headers) for r in rows)
    impq = result.row("impq", 2.5)
    assert rows[0][2] == f"{format_ppl(impq.ppl)} @{impq.avg_bits:.2f}"
    assert format_ppl(12.3456) == "12.35" and format_ppl(123456.7) == "123,457"


def compare_main(*args: str) -> int:
    """The command in this process (argparse errors raise SystemExit, user errors return 2)."""
    from impq_tui.cli import main

    return main(["compare", *map(str, args)])


def test_user_errors(tiny_run, tmp_path, capsys):
    assert compare_main(tiny_run.path, "--bits", "4.5") == 2
    assert "--bits 4.5 is outside [2, 4]" in capsys.readouterr().err
    assert compare_main(tmp_path) == 2
    assert "not an impq-tui run directory" in capsys.readouterr().err
    empty = RunDir.create(tmp_path / "empty", tiny_run.config)
    empty.unlock()
    assert compare_main(empty.path) == 2
    assert "no finished SPQE sample" in capsys.readouterr().err


def test_impq_local_rows_are_the_budget_local_solutions(result, tiny_run):
    """IMPQ-local's allocation at each budget is what `solve --local` gives, its predicted
    loss is the paper model's (comparable with IMPQ's), and it never beats IMPQ on that
    model (IMPQ is that model's optimum)."""
    from core.evaluate import allocate
    from core.interactions import predicted_delta, quadratic_model

    paper = quadratic_model(tiny_run.D())
    for b in BITS:
        local, impq = result.row("impq-local", b), result.row("impq", b)
        assert local.bits_per_layer == allocate(tiny_run, bits=b, local=True).bits_per_layer
        assert local.predicted_delta_nll == pytest.approx(
            predicted_delta(paper, [x == 2 for x in local.bits_per_layer]))
        assert impq.predicted_delta_nll <= local.predicted_delta_nll + 1e-9


def test_impq_fit_rows_are_the_fitted_models_solutions(result, tiny_run):
    """IMPQ-fit's allocation at each budget is what `solve` gives for it, within the same
    budget as every method, and the table has its ratio row."""
    from core.evaluate import allocate

    for b in BITS:
        fit = result.row("impq-fit", b)
        assert fit.bits_per_layer == allocate(tiny_run, bits=b, method="impq-fit").bits_per_layer
        assert fit.bytes <= fit.budget_bytes == result.row("impq", b).budget_bytes
    assert [r["target_bits"] for r in result.versus_best_baseline("impq-fit")] == BITS
    assert "IMPQ-fit / best baseline" in [row[0] for row in compare_rows(result)[1]]
    assert result.to_json()["impq_fit_vs_best_baseline"]


def test_a_comparison_of_an_earlier_impq_fit_says_so(tiny_run, result, tmp_path):
    """A saved comparison records its models' versions; the app's status line says when
    its IMPQ-fit rows come from an earlier IMPQ-fit (saved before versions were kept, or of
    another version), and not when they are current or absent."""
    import shutil

    from core.compare import CompareResult
    from impq_tui.widgets.compare import saved_status

    current = result.to_json()
    assert current["versions"] == {"impq-fit": 3}
    assert CompareResult.from_json(current).outdated() == ()
    unversioned = {k: v for k, v in current.items() if k != "versions"}
    assert CompareResult.from_json(unversioned).outdated() == ("impq-fit",)
    assert CompareResult.from_json({**current, "versions": {"impq-fit": 2}}).outdated() == ("impq-fit",)
    no_fit = {**unversioned, "results": [r for r in current["results"] if r["method"] != "impq-fit"]}
    assert CompareResult.from_json(no_fit).outdated() == ()

    copy = tmp_path / "run"
    shutil.copytree(tiny_run.path, copy, ignore=shutil.ignore_patterns("run.lock"))
    saved = copy / "compare" / f"{result.backend}.json"
    saved.parent.mkdir(exist_ok=True)
    for data, expected, style in ((unversioned, "come from an earlier IMPQ-fit", "yellow"),
                                  (current, "c runs it again", "dim")):
        saved.write_text(json.dumps(data))
        status, shown_style, shown = saved_status(RunDir.open(copy), result.backend, 3, 2.5)
        assert expected in status and shown_style == style, status
        assert shown.row("impq-fit", 2.5).ppl == result.row("impq-fit", 2.5).ppl


def test_a_comparison_saved_before_impq_local_still_reads(tiny_run, result):
    """compare/<backend>.json written before IMPQ-local existed has no such rows: the table,
    ratios and plot use the methods present."""
    from core.compare import CompareResult

    old = result.to_json()
    old["results"] = [r for r in old["results"]
                      if r["method"] not in ("impq-local", "impq-fit", "impq-checked")]
    del old["impq_local_vs_best_baseline"], old["impq_fit_vs_best_baseline"]
    del old["impq_checked_vs_best_baseline"]
    back = CompareResult.from_json(old)
    assert "impq-local" not in back.methods and back.versus_best_baseline("impq-local") == []
    headers, rows = compare_rows(back)
    assert [r[0] for r in rows[:2]] == ["IMPQ", "Sensitivity"]
    assert sum(r[0].endswith("best baseline") for r in rows) == 1
