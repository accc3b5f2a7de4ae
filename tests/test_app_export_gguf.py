"""The export screen with the gguf backend: it shows the llama.cpp type of each level the
export will write (a gguf run's own, those its byte costs were measured for; the gguf
defaults for any other run, as `impq-tui export --backend gguf` takes them), and an
export started there from a gguf run on a Hugging Face checkpoint converts the
checkpoint (its tensors counted on the screen's progress bar and in the log), quantizes
with llama.cpp and writes a .gguf whose tensors, read back with gguf-py, have the
allocated types and the run's byte costs."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from textual.widgets import RichLog, Select

from core.runs import RunDir
from impq_tui.app import ImpqApp
from impq_tui.screens.dashboard import Dashboard
from impq_tui.widgets.panes import JobProgress
from test_app import ROOT, SIZE, pilot_test, settled, text_of, until
from test_gguf_convert import save_checkpoint

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python (the gguf extra) is not installed")
LOW, HIGH = "Q3_K", "Q5_K"      # not the defaults (Q2_K, Q4_K): the run's pair must be the one used


@pytest.fixture(scope="module")
def gguf_run(tiny_tokenizer, tmp_path_factory):
    """A gguf run (Q3_K / Q5_K) on a tiny Llama checkpoint whose widths (256, 512) take
    K-quants, with no GGUF beside it: the export converts it. Weights drawn wide
    (initializer_range 0.2) so that quantizing hurts and 3 bits mixes the two types."""
    base = tmp_path_factory.mktemp("gguf-app")
    checkpoint = save_checkpoint(base / "tiny-hf", tiny_tokenizer, "llama", initializer_range=0.2,
                                 shape={"hidden": 256, "intermediate": 512})
    run = base / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "impq_tui", "run", "--model", str(checkpoint), "--backend", "gguf",
         "--gguf-types", LOW, HIGH, "--samples", "2", "--windows", "2", "--window-tokens", "16",
         "--device", "cpu", "--quiet", "--run-dir", str(run)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def recorded_steps(monkeypatch) -> list:
    seen = []
    original = JobProgress.step

    def step(self, step):
        seen.append(step)
        original(self, step)

    monkeypatch.setattr(JobProgress, "step", step)
    return seen


@needs_llama_cpp
@pilot_test
async def test_the_export_screen_writes_the_runs_gguf_types(gguf_run, tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("IMPQ_TUI_CACHE", str(tmp_path / "cache"))    # the conversion lands here
    steps = recorded_steps(monkeypatch)
    out = tmp_path / "exported"
    app = ImpqApp(str(gguf_run), bits=3.0, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        dash = app.screen
        await settled(pilot)
        bits = list(dash.allocation.bits_per_layer)
        assert sorted(bits) == [2, 4]               # 3 bits: one layer low, one high
        await pilot.press("e")
        screen = app.screen
        backend = screen.query_one("#export-backend", Select)
        types = screen.query_one("#export-gguf-types")
        assert backend.value == "gguf" and types.display      # the run's backend, its types shown
        assert text_of(types) == f"{LOW} / {HIGH} (the run's, as measured)"
        backend.value = "quanto"
        await pilot.pause()
        assert not types.display and not screen.query_one("#export-gguf-label").display
        backend.value = "gguf"
        await pilot.pause()
        assert types.display and screen.query_one("#export-out").value.endswith("gguf-3.00")
        screen.query_one("#export-out").value = str(out)
        await pilot.press("f5")
        await until(pilot, lambda: not screen.busy and "exported to" in text_of(
            screen.query_one("#export-result")), "the export")
        log = "\n".join(line.text for line in screen.query_one("#export-log", RichLog).lines)

    stored = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    costs = RunDir.open(gguf_run).costs()
    for layer, b in enumerate(bits):
        tensors = [t for name, t in stored.items() if name.startswith(f"blk.{layer}.")
                   and not name.endswith("norm.weight")]
        assert len(tensors) == 7 and {t.tensor_type.name for t in tensors} == {HIGH if b == 4 else LOW}
        assert sum(int(t.n_bytes) for t in tensors) == (costs.m_hi if b == 4 else costs.m_lo)[layer]
    # the conversion's progress: a step per tensor on the bar, and in the log
    converting = [s for s in steps if s.what == "converting to GGUF"]
    converted = next((tmp_path / "cache" / "gguf" / "converted").glob("*.gguf"))
    n = len(gguf.GGUFReader(str(converted)).tensors)
    assert converting and {s.total for s in converting} == {n} and converting[-1].done == n
    assert f"converting to GGUF: tensor {n} of {n}" in log


@needs_llama_cpp
@pilot_test
async def test_another_runs_gguf_export_shows_the_default_types():
    """A quanto run exported as gguf takes the gguf defaults for its levels, as the CLI
    does: the screen says so, and that the run's bytes were not measured for them."""
    app = ImpqApp(str(ROOT / "tests/fixtures/run-tiny8"), bits=3.0, cursor_blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, Dashboard), "the dashboard")
        await settled(pilot)
        await pilot.press("e")
        screen = app.screen
        types = screen.query_one("#export-gguf-types")
        assert screen.query_one("#export-backend", Select).value == "quanto" and not types.display
        screen.query_one("#export-backend", Select).value = "gguf"
        await pilot.pause()
        assert types.display
        assert text_of(types) == "Q2_K / Q4_K (the defaults; the run measured quanto sizes)"
