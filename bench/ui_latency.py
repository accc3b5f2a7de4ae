"""How long the app's event loop waits (a benchmark, not a test).

Drives the real app (ImpqApp under App.run_test with a Pilot, the budget keys delivered
as a terminal delivers them) on synthetic run directories of 30 and 80 layers, and records the event loop's lag: a task on the app's
own loop asks to wake every 10 ms and notes how late each wake-up comes. A loop that a
solve, a fit, a plot or a file read holds shows as a late wake-up. Phases:

    open      from starting the app to the first complete screen (estimates, the
              allocation at the budget and its bytes drawn: time_to_first_screen_s; how
              many of the last samples left it unchanged comes later)
    frontier  showing the Frontier view until all 41 budgets are drawn (frontier_s; the
              frontier is computed from the start, as no run competes for the CPU;
              frontier_coarse_s: the first five budgets, 2.0 to 4.0 by halves)

Times are seconds from starting the app, noted on the wake-up after they happen.
    budget    20 budget keys a tenth of a second apart (5 up, 10 down, 5 up by 0.05 bits),
              then until the last one is solved

plus the 41-budget frontier alone, outside the app (impq_tui.analysis in this process, one
thread: the work itself, without the app's solver process or its second thread). Each run
is measured in a process of its own, so that it pays the imports a fresh app pays, and
--repeat times (the machine may be shared: the summary gives each figure's range).

A run is written through core.runs.RunDir as `impq-tui run` writes one: config.json,
costs.json (byte costs of a SmolLM2-135M- or Llama-70B-shaped layer at 2 and 4 bits with
group-64 scales) and samples.jsonl, the samples being SPQE's walks over a synthetic
quadratic game v(x) = u.x + x.W.x/2 with interactions of both signs (as
tests/test_fit.py's games), so no model is loaded.

    python bench/ui_latency.py                       # writes bench/results/ui_latency.json
    python bench/ui_latency.py --runs 30:3 80:20 --repeat 3 --out /tmp/lat.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.runs import RunConfig, RunDir  # noqa: E402

TICK_S = 0.01
BUDGET_KEYS = 20
KEY_GAP_S = 0.1
PATIENCE_S = 300
# Linear weights per decoder layer: SmolLM2-135M (hidden 576, MLP 1536) and Llama-70B.
LAYER_PARAMS = {30: 3_538_944, 80: 855_638_016}


# ------------------------------------------------------------------ a synthetic run

def quadratic_game(L: int, seed: int):
    """v(x) - v(0) = u.x + x.W.x / 2 in nats/token: mostly positive sensitivities of a few
    hundredths, interactions of both signs about a tenth of them."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.002, 0.05, L)
    W = np.triu(rng.normal(0.0, 0.004, (L, L)), 1)
    W = W + W.T
    return lambda x: float(x @ u + 0.5 * x @ W @ x)


def write_synthetic_run(path: Path, layers: int, samples: int, seed: int = 0) -> RunDir:
    """A finished run directory of `samples` SPQE walks over the quadratic game."""
    params = LAYER_PARAMS.get(layers, 3_538_944)
    names = [[f"model.layers.{i}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj")] for i in range(layers)]
    scales = params // 64 * 4          # a float16 scale and zero point per group of 64
    config = RunConfig(model=f"synthetic-{layers}", model_name=f"synthetic-{layers}",
                       samples=samples, windows=8, window_tokens=128, seed=seed)
    run = RunDir.create(path, config)
    run.write_costs({"m_lo": [params // 4 + scales] * layers,
                     "m_hi": [params // 2 + scales] * layers,
                     "params": [params] * layers, "layers": names})
    v = quadratic_game(layers, seed)
    rng = np.random.default_rng(seed + 1)
    for m in range(samples):
        perm = rng.permutation(layers)
        x, d = np.zeros(layers), np.zeros(layers)
        for i in perm:
            before = v(x)
            x[i] = 1.0
            d[i] = v(x) - before
        run.append_sample({"m": m, "perm": perm.tolist(), "d": d.tolist(), "v_high": 3.0,
                           "v_low": 3.0 + v(np.ones(layers)), "seconds": 1.0})
    run.write_json("status.json", {"state": "completed", "pid": 0, "time": time.time(),
                                   "message": "", "progress": None})
    run.unlock()
    return run


# ------------------------------------------------------------------ measuring

class LagMonitor:
    """Wakes every TICK_S on the running loop; each wake-up's lateness goes to the phase
    current at that moment."""

    def __init__(self, t0: float) -> None:
        self.phase = "open"
        self.lags: dict[str, list[float]] = {}
        self._task: asyncio.Task | None = None
        self.t0 = t0
        self.watch: dict = {}          # name -> condition, looked at on every wake-up
        self.seen: dict[str, float] = {}   # name -> seconds from t0 when it first held

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            self.lags.setdefault(self.phase, []).append(now - last - TICK_S)
            last = now
            for name, condition in list(self.watch.items()):
                if condition():
                    self.seen[name] = round(now - self.t0, 3)
                    del self.watch[name]

    def stop(self) -> None:
        self._task.cancel()

    def summary(self) -> dict:
        return {phase: stats(values) for phase, values in self.lags.items()}


def stats(lags: list[float]) -> dict:
    ms = np.maximum(np.asarray(lags), 0.0) * 1000
    return {"ticks": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


async def until(pilot, condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        await pilot.pause(0.02)


def settled(app) -> bool:
    dash = app.dashboard
    return (dash is not None and dash.is_current and dash.allocation is not None
            and not any(w.is_running for w in app.workers if w.group in ("solve",)))


def type_key(app, key: str) -> None:
    """A key as the terminal delivers it. (Pilot.press waits until the process's CPU is
    idle after each key, which a solve in a thread keeps it from being: keys would come
    one per solve, not at a person's pace.)"""
    from textual import events as textual_events

    event = textual_events.Key(key, None)
    event.set_sender(app)
    app._driver.send_message(event)


async def drive(run_dir: Path) -> dict:
    """The phases of the module doc on `run_dir`; the time to the first screen counts
    importing the app (in a fresh process, as `impq-tui --run DIR` does), the lag only
    what happens once its event loop runs."""
    t0 = time.perf_counter()
    from impq_tui.app import ImpqApp
    from core.solver import FRONTIER_GRID

    monitor = LagMonitor(t0)
    app = ImpqApp(str(run_dir), cursor_blink=False)

    def first_screen() -> bool:
        dash = app.dashboard
        return dash is not None and dash.is_current and dash.allocation is not None

    def frontier(points: int):
        return lambda: app.dashboard is not None and len(app.dashboard.frontier or ()) >= points

    monitor.watch = {"time_to_first_screen_s": first_screen, "frontier_coarse_s": frontier(5),
                     "frontier_s": frontier(len(FRONTIER_GRID))}
    monitor.start()
    out: dict = {}
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: "time_to_first_screen_s" in monitor.seen,
                    "the first complete screen")
        dash = app.screen
        monitor.phase = "frontier"
        type_key(app, "4")
        await until(pilot, lambda: "frontier_s" in monitor.seen, "the whole frontier")

        monitor.phase = "budget"
        t = time.perf_counter()
        for k in range(BUDGET_KEYS):
            type_key(app, "right" if k < 5 or k >= 15 else "left")
            await asyncio.sleep(KEY_GAP_S)
        out["keys_s"] = round(time.perf_counter() - t, 3)
        await until(pilot, lambda: settled(app), "the last budget")
        out["budget_s"] = round(time.perf_counter() - t, 3)
        out["final_bits"] = dash.bits
        monitor.phase = "quit"
        await pilot.press("q")
    monitor.stop()
    out.update(monitor.seen)
    out["lag"] = monitor.summary()
    out["lag"].pop("quit", None)
    all_lags = [x for phase, v in monitor.lags.items() if phase != "quit" for x in v]
    out["lag"]["all"] = stats(all_lags)
    return out


def frontier_alone(run_dir: Path) -> dict:
    """The 41 budgets solved one after another in this process (after the app has gone)."""
    from impq_tui import analysis

    run = RunDir.open(run_dir)
    D = run.D()
    allocations = analysis.Allocations(run.costs())
    t = time.perf_counter()
    points = analysis.frontier_points(D, allocations)
    return {"seconds": round(time.perf_counter() - t, 3), "budgets": len(points)}


def measure(spec: str, run_dir: Path) -> dict:
    """One synthetic run LAYERS:SAMPLES, written by the parent process (writing one imports
    torch, which `impq-tui --run DIR` never does: here its objects would lengthen every
    full garbage collection on the app's loop), opened here."""
    layers, samples = map(int, spec.split(":"))
    record = {"layers": layers, "samples": samples, "loadavg_before": os.getloadavg()[0]}
    record.update(asyncio.run(drive(run_dir)))
    record["torch_imported"] = "torch" in sys.modules
    record["frontier_alone"] = frontier_alone(run_dir)
    record["loadavg_after"] = os.getloadavg()[0]
    return record


def summary(results: list[dict]) -> list[dict]:
    """Per run (layers:samples), each figure's [min, max] over its repeats; the lag over all
    phases, and the worst phase's p99 and max."""
    out = []
    for spec in dict.fromkeys(f"{r['layers']}:{r['samples']}" for r in results):
        rs = [r for r in results if f"{r['layers']}:{r['samples']}" == spec]

        def span(values):
            return [min(values), max(values)]

        phases = [p for r in rs for name, p in r["lag"].items() if name != "all"]
        out.append({
            "run": spec, "repeats": len(rs),
            "first_screen_s": span([r["time_to_first_screen_s"] for r in rs]),
            "frontier_coarse_s": span([r["frontier_coarse_s"] for r in rs]),
            "frontier_s": span([r["frontier_s"] for r in rs]),
            "frontier_alone_s": span([r["frontier_alone"]["seconds"] for r in rs]),
            "lag_all_p50_ms": span([r["lag"]["all"]["p50_ms"] for r in rs]),
            "lag_all_p99_ms": span([r["lag"]["all"]["p99_ms"] for r in rs]),
            "lag_all_max_ms": span([r["lag"]["all"]["max_ms"] for r in rs]),
            "worst_phase_p99_ms": max(p["p99_ms"] for p in phases),
            "worst_phase_max_ms": max(p["max_ms"] for p in phases),
            "loadavg": span([r["loadavg_before"] for r in rs] + [r["loadavg_after"] for r in rs]),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=["30:3", "30:40", "80:20", "80:100"],
                        help="LAYERS:SAMPLES of each synthetic run")
    parser.add_argument("--repeat", type=int, default=2,
                        help="measurements of each run, each in a process of its own")
    parser.add_argument("--out", default=str(ROOT / "bench/results/ui_latency.json"))
    parser.add_argument("--one", nargs=2, metavar=("LAYERS:SAMPLES", "RUN_DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:            # a run of its own process: it pays the imports, as the app does
        print(json.dumps(measure(args.one[0], Path(args.one[1]))))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="impq-ui-latency-") as tmp:
        for spec in args.runs:
            layers, samples = map(int, spec.split(":"))
            run_dir = Path(tmp) / f"synthetic-{layers}x{samples}"
            write_synthetic_run(run_dir, layers, samples)
            for k in range(args.repeat):
                proc = subprocess.run([sys.executable, __file__, "--one", spec, str(run_dir)],
                                      capture_output=True, text=True, check=True, cwd=ROOT)
                record = {"repeat": k + 1, **json.loads(proc.stdout.strip().splitlines()[-1])}
                print(json.dumps(record), flush=True)
                results.append(record)
    import textual

    report = {"bench": "ui_latency", "tick_ms": TICK_S * 1000, "budget_keys": BUDGET_KEYS,
              "key_gap_s": KEY_GAP_S, "cpus": os.cpu_count(), "python": platform.python_version(),
              "textual": textual.__version__, "machine": platform.machine(),
              "targets": {"p99_ms": 100, "max_ms": 250, "first_screen_s": 2.0,
                          "frontier_80_layers_s": 2.0},
              "note": "Solves, fits, K's colours, the stability check and the frontier run "
                      "in the dashboard's solver process (impq_tui.solver_process, nice 10, "
                      "the frontier two budgets at a time); the lag is the event loop's own "
                      "work: drawing (the first complete screen, plots redrawn per frontier "
                      "batch and per budget) and garbage collection. The run folders are "
                      "written by the parent process, so the measured process does not "
                      "import torch (torch_imported), as `impq-tui --run DIR` does not. "
                      "loadavg: the machine's 1-minute load around each run (2 cores, "
                      "shared with other sessions).",
              "summary": summary(results), "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
