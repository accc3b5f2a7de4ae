"""The form says how long a run will take before F5, and how it knows: from the seconds a
run of the same model on the same device measured, or from a probe of the real
evaluator on the model's shape."""
from __future__ import annotations

import asyncio
import functools
import json
import statistics
import time
from pathlib import Path

import pytest
from run_factory import FROZEN, copy_frozen

from core.models import tiny_config
from impq_tui import estimate
from impq_tui.app import ImpqApp
from impq_tui.screens.picker import RunScan
from impq_tui.screens.setup import SetupDefaults, SetupScreen, about, default_samples

ROOT = Path(__file__).resolve().parent.parent


def pilot_test(test):
    """Run an async Pilot test on a fresh event loop (no asyncio plugin needed)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))
    return run


async def estimated(pilot, timeout: float = 120) -> SetupScreen:
    deadline = time.monotonic() + timeout
    while not (isinstance(pilot.app.screen, SetupScreen) and pilot.app.screen.estimate):
        assert time.monotonic() < deadline, "the form never showed its estimate"
        await pilot.pause(0.05)
    return pilot.app.screen


@pytest.fixture(autouse=True)
def _no_cached_estimates(monkeypatch):
    monkeypatch.setattr(SetupScreen, "measured", {})


def test_a_sample_costs_L_evaluations_of_half_the_layers_on_average():
    e = estimate.from_probe(30, layer_s=0.2, head_s=0.5, device="cpu", windows=8,
                            window_tokens=128)
    assert e.sample_s == pytest.approx(30 * (0.5 + 0.2 * 31 / 2))
    assert e.run_s(10) == pytest.approx(10 * e.sample_s)
    assert "probed now on cpu" in e.how and "8×128" in e.how


def test_the_probe_times_the_real_evaluator(monkeypatch):
    """The probe runs PrefixEvaluator on a random model of the shape; from its times from
    the first and from the last of its layers it takes one layer's and the head's, the
    head scaled to the full vocabulary, both to all the windows. (The times are replaced
    by fixed ones: speed on a shared machine is no test's business.)"""
    config = tiny_config(layers=6, hidden=128, intermediate=256, vocab=2 * estimate.PROBE_VOCAB)
    seen = []

    def timed(evaluate, from_layer, device):
        seen.append((evaluate.__self__.L, evaluate.__self__.windows.shape, from_layer))
        return {0: 0.5 + 4 * 0.1, estimate.PROBE_LAYERS - 1: 0.5 + 0.1}[from_layer]

    monkeypatch.setattr(estimate, "_timed", timed)
    layer_s, head_s = estimate.probe(estimate.Shape(config, 6), "cpu", "float32", windows=8,
                                     window_tokens=64, micro_batch=4)
    assert {s[:2] for s in seen} == {(estimate.PROBE_LAYERS, (4, 64))}   # one micro-batch
    assert layer_s == pytest.approx(0.1 * 2)              # 8 windows are two micro-batches
    assert head_s == pytest.approx(0.5 * 2 * 2)           # and the vocabulary is twice the probe's


def test_model_shapes_come_from_local_files_only(tmp_path):
    assert estimate.model_shape("embedded").layers == 30
    assert estimate.model_shape("random:llama-3.1-8b").layers == 32
    assert estimate.model_shape(str(tmp_path / "model.gguf")) is None     # no such file
    (tmp_path / "broken.gguf").write_bytes(b"GGUF not really")
    assert estimate.model_shape(str(tmp_path / "broken.gguf")) is None
    from core.models import _installed_embedded_gguf

    gguf = _installed_embedded_gguf()
    if gguf is not None:          # the embedded model's own GGUF, from its header alone
        started = time.monotonic()
        shape = estimate.model_shape(str(gguf))
        assert (shape.layers, shape.config.hidden_size, shape.config.intermediate_size) == (30, 576, 1536)
        assert time.monotonic() - started < 5
    started = time.monotonic()
    assert estimate.model_shape("nobody/no-such-model-here") is None    # no network asked
    assert time.monotonic() - started < 10


def test_history_uses_the_measured_seconds_scaled_to_the_calibration(tmp_path):
    copy_frozen(tmp_path / "runs" / "tiny8")
    runs = RunScan(tmp_path / "runs").scan()
    seconds = [json.loads(line)["seconds"] for line in (FROZEN / "samples.jsonl").open()]
    model = json.loads((FROZEN / "config.json").read_text())["model"]
    same = estimate.from_history(runs, model, "cpu", "float32", windows=4, window_tokens=32)
    assert same.sample_s == pytest.approx(statistics.median(seconds[1:]))   # first: warm-up
    assert same.layers == 8 and "measured by run tiny8" in same.how
    double = estimate.from_history(runs, model, "cpu", "float32", windows=8, window_tokens=32)
    assert double.sample_s == pytest.approx(2 * same.sample_s) and "scaled to 8×32" in double.how
    assert estimate.from_history(runs, model, "cuda", "bfloat16", 4, 32) is None
    assert estimate.from_history(runs, "embedded", "cpu", "float32", 4, 32) is None


@pilot_test
async def test_the_form_shows_the_duration_and_how_it_knows(monkeypatch):
    monkeypatch.setattr(estimate, "probe", lambda *args: (0.25, 0.6))
    app = ImpqApp(setup=SetupDefaults(device="cpu"), cursor_blink=False)
    async with app.run_test(size=(100, 30)) as pilot:
        form = await estimated(pilot)
        assert form.value("samples") == str(default_samples('cpu'))
        sample_s = 30 * (0.6 + 0.25 * 31 / 2)
        text = str(form.query_one("#setup-estimate").render())
        assert f"≈ {about(default_samples('cpu') * sample_s)}" in text and "probed now on cpu" in text
        assert "CPU default" in text
        # more samples: the same rate, a longer run, no new probe; a maximum, since Stop
        # when settled (on by default) may end it sooner
        form.query_one("#samples").value = "40"
        await pilot.pause()
        assert f"≤ {about(40 * sample_s)}" in str(form.query_one("#setup-estimate").render())
        form.query_one("#samples").value = "4O"
        await pilot.pause()
        assert "no estimate until Samples M" in str(form.query_one("#setup-estimate").render())


@pilot_test
async def test_the_form_uses_a_run_of_the_same_model_when_there_is_one(tmp_path, monkeypatch):
    def no_probe(*args):
        raise AssertionError("a measured rate was there: no probe needed")

    monkeypatch.setattr(estimate, "probe", no_probe)
    copy_frozen(tmp_path / "runs" / "tiny8")
    model = json.loads((FROZEN / "config.json").read_text())["model"]
    app = ImpqApp(runs=str(tmp_path / "runs"),
                  setup=SetupDefaults(model=model, device="cpu", windows=4, window_tokens=32),
                  cursor_blink=False)
    async with app.run_test(size=(100, 30)) as pilot:
        deadline = time.monotonic() + 60
        while type(app.screen).__name__ != "RunPicker":
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await pilot.press("n")
        form = await estimated(pilot)
        assert "measured by run tiny8" in str(form.query_one("#setup-estimate").render())


def test_the_settled_share_is_the_one_measured():
    """The share of its samples a settled run takes, as the form says it, is what
    bench/early_stop.py measured with the default rule (mean stop over the maximum)."""
    from core.settle import SettleRule

    data = json.loads((ROOT / "bench/results/early_stop.json").read_text())
    rule = SettleRule()
    assert data["defaults"]["K"] == rule.K and data["defaults"]["rse"] == rule.rse
    shares = []
    for run in data["runs"].values():
        [row] = [r for r in run["settings"] if (r["K"], r["rse"], r["min_samples"], r["tol"])
                 == (rule.K, rule.rse, rule.min_samples, rule.tol)]
        shares.append(row["stop_mean"] / run["samples"])
    assert estimate.SETTLED_SHARE == pytest.approx(statistics.mean(shares), abs=0.005)
    assert estimate.earliest_stop() == max(rule.min_samples, rule.K + 1) == 20


@pilot_test
async def test_the_estimate_is_a_maximum_when_the_run_may_stop_once_settled(monkeypatch):
    monkeypatch.setattr(estimate, "probe", lambda *args: (0.25, 0.6))
    app = ImpqApp(setup=SetupDefaults(device="cpu", samples=100), cursor_blink=False)
    async with app.run_test(size=(100, 30)) as pilot:
        form = await estimated(pilot)
        full = about(form.estimate.run_s(100))

        def shown() -> str:
            return " ".join(str(form.query_one("#setup-estimate").render()).split())

        assert shown().startswith(f"≤ {full} for 100 × 30 evaluations")
        assert "a maximum: Stop when settled ends runs sooner (82% of the samples on average, " \
               "measured on the embedded model)" in shown()
        assert not form.query_one("#settle-short").display
        # too few samples for the rule to stop a run: an estimate again, and said beside it
        form.query_one("#samples").value = "20"
        await pilot.pause()
        assert shown().startswith(f"≈ {about(form.estimate.run_s(20))} for 20") and "82%" not in shown()
        assert form.query_one("#settle-short").display
        assert "needs > 20 samples" in str(form.query_one("#settle-short").render())
        # off: every sample runs
        form.query_one("#samples").value = "100"
        await pilot.click("#until_settled")
        await pilot.pause()
        assert shown().startswith(f"≈ {full} for 100") and "82%" not in shown()
        assert not form.query_one("#settle-short").display


def test_about_reads_like_an_estimate():
    assert [about(s) for s in (40, 1300, 7800, 3 * 86400 + 4 * 3600)] == [
        "40 s", "22 min", "2 h 10 min", "3 d 4 h"]


@pilot_test
async def test_windows_follow_the_backend_until_typed(monkeypatch):
    """On a GPU quanto and HQQ calibrate on 4 windows, GPTQ and GGUF on 16
    (core.settings.device_defaults, tested in test_cli). This machine has no GPU, so the
    GPU's rule is laid over the CPU's sizes here; what is tested is the form: Windows follows
    the backend while it holds the default the form filled in, and a typed value stays."""
    from impq_tui.screens import setup

    real = setup.defaults_for
    monkeypatch.setattr(setup, "defaults_for", lambda device, backend=None: {
        **real(device, backend), "windows": 4 if backend in ("quanto", "hqq") else 16})
    monkeypatch.setattr(estimate, "probe", lambda *args: (0.25, 0.6))
    app = ImpqApp(setup=SetupDefaults(device="cpu", backend="quanto"), cursor_blink=False)
    async with app.run_test(size=(100, 30)) as pilot:
        form = await estimated(pilot)
        backend = form.query_one("#backend")
        assert form.value("windows") == "4"
        for name, windows in (("gguf", "16"), ("hqq", "4"), ("quanto", "4"), ("gguf", "16")):
            backend.value = name
            await pilot.pause()
            assert form.value("windows") == windows, name
        form.query_one("#windows").value = "6"
        backend.value = "hqq"
        await pilot.pause()
        assert form.value("windows") == "6"
