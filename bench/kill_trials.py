"""SIGKILL at random moments (a repeatable script, not a test).

Builds a tiny real checkpoint (8-layer Llama config, random weights), makes one
uninterrupted reference run, then runs the same run (same seed) again and again with
`impq-tui run`, each time killing it with SIGKILL after a random delay drawn over the
whole life of a run (start-up, model loading and quantization, sampling, writing), and
continuing it as a user would: `--resume DIR` once config.json exists, the same
`--run-dir` before. A run that completes is checked against the reference and a new one
starts, until the number of kills asked for is reached. After every kill:

- no finished sample is lost: the samples on disk are at least those seen finished
  just before the kill, and read without error;
- the run continues (the resume exits 0 or is killed by the next trial).

    python bench/kill_trials.py --trials 20 --out bench/results/kill_trials.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from core.runs import SAMPLES, RunDir  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT)}


def command(model: Path, path: Path, samples: int) -> list[str]:
    base = [sys.executable, "-m", "impq_tui", "run", "--quiet"]
    if (path / "config.json").is_file():
        return [*base, "--resume", str(path)]
    return [*base, "--model", str(model), "--samples", str(samples), "--run-dir", str(path),
            "--windows", "16", "--window-tokens", "128", "--device", "cpu", "--seed", "7"]


def finished_lines(path: Path) -> int:
    try:
        return (path / SAMPLES).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def phase(path: Path) -> str:
    if not (path / "config.json").is_file():
        return "starting"
    if not (path / "costs.json").is_file():
        return "loading and quantizing"
    return "sampling"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samples", type=int, default=30, help="samples per run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    args = parser.parse_args()

    from conftest import _train_tokenizer, save_tiny_model

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="impq-kill-"))
    model = save_tiny_model(work / "model", _train_tokenizer(), layers=8)

    t0 = time.perf_counter()
    reference = work / "reference"
    proc = subprocess.Popen(command(model, reference, args.samples), env=ENV, cwd=ROOT)
    first_s = None
    while proc.poll() is None:
        if first_s is None and finished_lines(reference) >= 1:
            first_s = time.perf_counter() - t0
        time.sleep(0.005)
    assert proc.returncode == 0, "the reference run failed"
    full_s = time.perf_counter() - t0
    first_s = first_s or full_s
    D_ref = RunDir.open(reference).D()

    trials, runs = [], []
    run_no, path, attempts = 0, work / "run-0", 0
    while len(trials) < args.trials:
        # a quarter of the kills anywhere in start-up, loading and quantization; the rest
        # while samples are being computed and written
        delay = (rng.uniform(0.0, first_s) if rng.random() < 0.25
                 else rng.uniform(first_s, 1.05 * full_s))
        proc = subprocess.Popen(command(model, path, args.samples), env=ENV, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        attempts += 1
        deadline = time.perf_counter() + delay
        while time.perf_counter() < deadline and proc.poll() is None:
            time.sleep(0.005)
        if proc.poll() is None:
            seen = finished_lines(path)
            where = phase(path)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            error = None
            try:
                kept = len(RunDir.open(path).samples()) if (path / "config.json").is_file() else 0
            except Exception as exc:          # a damaged file is a failed trial, not a crash
                kept, error = -1, f"{type(exc).__name__}: {exc}"
            trials.append({"trial": len(trials), "run": run_no, "delay_s": round(delay, 3),
                           "phase": where, "finished_before_kill": seen, "kept": kept,
                           "lost": max(0, seen - kept) if kept >= 0 else seen, "error": error})
            print(f"kill {len(trials):2d}: after {delay:5.2f}s while {where:23s} "
                  f"{seen:2d} samples seen, {kept:2d} kept", flush=True)
            continue
        if proc.returncode != 0:
            trials.append({"trial": len(trials), "run": run_no, "phase": "resume failed",
                           "error": proc.stderr.read()[-2000:], "lost": None})
            print(f"resume failed: {trials[-1]['error']}", flush=True)
            break
        D = RunDir.open(path).D()
        equal = D.shape == D_ref.shape and bool(np.array_equal(D, D_ref))
        runs.append({"run": run_no, "kills": sum(t["run"] == run_no for t in trials),
                     "samples": int(D.shape[0]), "equal_to_uninterrupted": equal})
        print(f"run {run_no} completed after {runs[-1]['kills']} kills: vectors "
              f"{'equal to' if equal else 'DIFFER from'} the uninterrupted run", flush=True)
        run_no += 1
        path = work / f"run-{run_no}"

    # finish the run the last kill interrupted, and check it too
    if trials and trials[-1]["run"] == run_no and trials[-1].get("phase") != "resume failed":
        done = subprocess.run(command(model, path, args.samples), env=ENV, cwd=ROOT,
                              capture_output=True, text=True)
        D = RunDir.open(path).D() if done.returncode == 0 else np.empty(0)
        equal = done.returncode == 0 and bool(np.array_equal(D, D_ref))
        runs.append({"run": run_no, "kills": sum(t["run"] == run_no for t in trials),
                     "samples": int(D.shape[0]) if D.ndim == 2 else 0, "equal_to_uninterrupted": equal})
        print(f"run {run_no} completed after {runs[-1]['kills']} kills: vectors "
              f"{'equal to' if equal else 'DIFFER from'} the uninterrupted run", flush=True)

    equal_runs = {r["run"] for r in runs if r["equal_to_uninterrupted"]}
    survived = [t for t in trials if t.get("lost") == 0 and not t.get("error")
                and t["run"] in equal_runs]
    result = {
        "trials": len(trials), "survived": len(survived),
        "samples_lost": sum(t["lost"] or 0 for t in trials),
        "phases": {p: sum(t["phase"] == p for t in trials) for p in sorted({t["phase"] for t in trials})},
        "runs": runs, "uninterrupted_run_s": round(full_s, 2), "samples_per_run": args.samples,
        "first_sample_s": round(first_s, 2),
        "model": "8-layer Llama config, random weights, 16 x 128 calibration tokens, CPU",
        "host": f"{platform.node()} ({os.cpu_count()} CPUs)", "kill_seed": args.seed,
        "trials_detail": trials,
    }
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "trials_detail"}, indent=1))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["survived"] == result["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
