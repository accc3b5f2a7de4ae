"""Real losses of given allocations of real runs (GPU): the evaluation text in two halves
and the run's own calibration windows.

Input: a JSON file {"runs": {run_dir: {group: {label: [bits per layer]}}}} (a group is
usually a budget). Each run's model is loaded once the way compare loads it (the run's
dtype, the real backend's modules); every distinct allocation, with all-low and
all-high added, is evaluated by swapping module references, in lexicographic order so
that consecutive evaluations share a prefix of layers:
  eval_a, eval_b  mean next-token NLL on the first and second half of the evaluation
                  windows eval and compare use (disjoint from the calibration text): a
                  study can choose on one half and report on the other;
  eval            on all of them (the number compare reports);
  calib           on the run's calibration windows, the text SPQE measured: calib minus
                  the all-high calib is the v(S) - v({}) that IMPQ-fit predicts.
Writes {"runs": {run_dir: {"allocations": {bits string: {...}}, "labels": {group:
{label: bits string}}}}} and the command, device and seconds.

    python bench/eval_allocations.py CANDIDATES.json --device cuda --out RESULT.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.compare import _load, calibration_windows  # noqa: E402
from core.data import eval_tokens  # noqa: E402
from core.runs import RunDir, write_atomic  # noqa: E402
from core.switching import LayerSwitch, PrefixEvaluator  # noqa: E402


def key(bits) -> str:
    return "".join(str(int(b)) for b in bits)


def open_run(path: str, device: str, windows, log):
    """A run's model loaded the way compare loads it, with its evaluation tokens and the
    real backend's modules to switch: (run, loaded, tokens, real)."""
    run = RunDir.open(path if Path(path).is_absolute() else str(ROOT / path))
    config = run.config
    loaded, backend, settings = _load(run, device, None, None, windows, None, log)
    tokens = eval_tokens(loaded.tokenizer, settings, config.calib_text, log)
    real = LayerSwitch(loaded, backend, real=True, keep_original=False,
                       levels=[config.levels] * len(loaded.layers))
    return run, loaded, tokens, real


def evaluate_all(real: LayerSwitch, evaluators: dict, wanted) -> dict:
    """{allocation: {name: mean NLL by that evaluator}} for every allocation (a tuple of
    bits per layer) in lexicographic order, so that consecutive ones share a prefix."""
    out = {}
    with torch.inference_mode():
        for bits in sorted(wanted):
            first = real.apply(bits)
            first = 0 if first is None else first
            out[bits] = {name: ev.evaluate(first) for name, ev in evaluators.items()}
    return out


def measure(path: str, groups: dict, device: str, log) -> dict:
    run, loaded, tokens, real = open_run(path, device, None, log)
    config = run.config
    half = tokens.shape[0] // 2
    micro = max(1, config.micro_batch)
    evaluators = {"eval_a": PrefixEvaluator(loaded, tokens[:half], micro),
                  "eval_b": PrefixEvaluator(loaded, tokens[half:], micro),
                  "calib": PrefixEvaluator(loaded, calibration_windows(loaded, config), micro)}
    L = len(loaded.layers)
    lo, hi = min(config.levels), max(config.levels)
    wanted = {tuple([lo] * L), tuple([hi] * L)}
    for labels in groups.values():
        wanted |= {tuple(int(b) for b in bits) for bits in labels.values()}
    t = time.perf_counter()
    na, nb = evaluators["eval_a"].predicted, evaluators["eval_b"].predicted
    out = {}
    for bits, row in evaluate_all(real, evaluators, wanted).items():
        row["eval"] = (row["eval_a"] * na + row["eval_b"] * nb) / (na + nb)
        out[key(bits)] = row
    log(f"{path}: {len(wanted)} allocations in {time.perf_counter() - t:.1f}s")
    return {"allocations": out, "all_low": key([lo] * L), "all_high": key([hi] * L),
            "labels": {g: {label: key(bits) for label, bits in labels.items()} for g, labels in groups.items()},
            "tokens": {name: int(ev.predicted) for name, ev in evaluators.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("candidates")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    spec = json.loads(Path(args.candidates).read_text())
    report = {"command": " ".join(["bench/eval_allocations.py"] + sys.argv[1:]),
              "device": device_name(), "runs": {}}
    write_report(report, spec["runs"], lambda path, groups, log: measure(path, groups, args.device, log),
                 args.out)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()


def write_report(report: dict, runs: dict, measure, out: str) -> None:
    """report["runs"][path] = measure(path, entry, log) for each run, then the seconds it
    took, written to `out` as JSON."""
    t0 = time.perf_counter()
    for path, entry in runs.items():
        report["runs"][path] = measure(path, entry, lambda msg, level="info": print(msg, flush=True))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_atomic(Path(out), json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
