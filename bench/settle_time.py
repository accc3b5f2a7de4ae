"""Time to a settled allocation for a large model (issue 17), from timed runs' logs.

Input: logs of `impq-tui run` on the GPU, each line of its output prefixed by the seconds
since the command started (`phases-*.log`, written by piping the run through a
timestamper, see bench/results/settle-8b-h200-w4/README), and its `events.log`; and the
samples-to-stop of bench/early_stop.py on real runs of the embedded model calibrated on
as many windows. From them:
  start-up       seconds to the run's first quantized layer, optimum-quanto's one-time
                 CUDA build (when the log shows it) apart;
  seconds/sample the median of `sample k done in X s` over samples 2.. (sample 1 pays for
                 compiling);
  to settled     to the end of sample 1 + (m - 1) x seconds/sample at the mean, p10 and
                 p90 samples-to-stop m of the default rule (K = 10), without the one-time
                 build (a second run on the machine) and with it.

    python bench/settle_time.py --timed bench/results/settle-8b-h200-w4/phases-timed-100.log \
        bench/results/settle-8b-h200-w4/events-timed-100.log \
        --early-stop bench/results/early_stop_w4.json --windows 4 \
        --out bench/results/settle_time_8b_h200_w4.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.runs import write_atomic  # noqa: E402
from core.settle import SettleRule  # noqa: E402

STAMP = re.compile(r"^(\d+\.\d) (.*)$")
DONE = re.compile(r"sample (\d+) done in ([\d.]+)s")


def phases(path: Path) -> dict:
    """Seconds from the command's start to each phase of a timestamped run log."""
    out = {}
    for line in path.read_text().splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t, text = float(m.group(1)), m.group(2)
        if "building optimum-quanto's CUDA kernels" in text:
            out["kernel_build_from_s"] = t
        elif text.startswith("quantized layer") and "first_layer_s" not in out:
            out["first_layer_s"] = t
        elif text.startswith("sample 1 done"):
            out["end_of_sample_1_s"] = t
        elif text.startswith("run directory:"):
            out["end_s"] = t
        elif text.startswith("memory plan") and "memory_plan_s" not in out:
            out["memory_plan_s"] = t
    return out


def per_sample(events: Path) -> list[float]:
    return [float(m.group(2)) for m in map(DONE.search, events.read_text().splitlines()) if m]


def default_stops(early_stop: Path) -> dict:
    """{run: (mean, p10, p90)} samples-to-stop of the default rule in an early_stop.py report."""
    rule = SettleRule()
    report = json.loads(early_stop.read_text())
    out = {}
    for path, r in report["runs"].items():
        for row in r["settings"]:
            if (row["K"], row["rse"], row["min_samples"], row["tol"]) == (rule.K, rule.rse, rule.min_samples, rule.tol):
                out[path] = {"mean": row["stop_mean"], "p10": row["stop_p10"], "p90": row["stop_p90"],
                             "reached_max_share": row["reached_max_share"], "samples": r["samples"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timed", nargs=2, metavar=("PHASES", "EVENTS"), required=True)
    p.add_argument("--early-stop", required=True, help="bench/early_stop.py's report on runs of as many windows")
    p.add_argument("--windows", type=int, required=True)
    p.add_argument("--compare", nargs=3, action="append", default=[], metavar=("WINDOWS", "PHASES", "EVENTS"),
                   help="shorter timed runs at other window counts (seconds per sample only)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ph = phases(Path(args.timed[0]))
    secs = per_sample(Path(args.timed[1]))
    spp = statistics.median(secs[1:])
    build = ph["first_layer_s"] - ph["kernel_build_from_s"] if "kernel_build_from_s" in ph else 0.0
    to_1 = ph["end_of_sample_1_s"]
    stops = default_stops(Path(args.early_stop))
    projected = {}
    for run, s in stops.items():
        for k in ("mean", "p10", "p90"):
            m = s[k]
            projected[f"{Path(run).name} {k} {m:g} samples"] = {
                "warm_min": round((to_1 - build + (m - 1) * spp) / 60, 1),
                "first_run_min": round((to_1 + (m - 1) * spp) / 60, 1)}
    report = {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": " ".join(["bench/settle_time.py"] + sys.argv[1:]),
        "windows": args.windows,
        "timed_run": {"samples": len(secs), "wall_s": ph.get("end_s"), "phases": ph,
                      "kernel_build_s": round(build, 1), "sample_1_s": secs[0],
                      "seconds_per_sample": spp, "max_sample_s": max(secs[1:]),
                      "wall_without_kernel_build_s": round(ph["end_s"] - build, 1) if "end_s" in ph else None},
        "samples_to_stop_default_rule": stops,
        "projected_to_settled": projected,
        "samples_within_10_min_warm": int((600 - (to_1 - build)) // spp) + 1,
        "seconds_per_sample_by_windows": {str(args.windows): spp},
    }
    for w, ph_path, ev_path in args.compare:
        report["seconds_per_sample_by_windows"][w] = statistics.median(per_sample(Path(ev_path))[1:])
        report.setdefault("other_runs", {})[w] = phases(Path(ph_path))
    write_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("timed_run", "projected_to_settled", "samples_within_10_min_warm",
                                             "seconds_per_sample_by_windows")}, indent=1))


if __name__ == "__main__":
    main()
