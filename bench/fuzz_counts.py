"""Input fuzzing, counted (issue 7): runs tests/test_fuzz.py with its example counts
multiplied by --scale and writes how many inputs the text loaders and the command line
were given, how many ended in a traceback or a hang, and the bugs the fuzzing led to.

    python bench/fuzz_counts.py --scale 10 --out bench/results/fuzz.json

The counts come from the tests themselves (each example that reaches load_text or
impq_tui.cli.main counts once); a failing test is reported with its first error line,
a Hang (no answer within the test's time limit) separately from other failures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What the fuzzing found and what was changed (file: what). "hypothesis": a generated
# input failed a test; "review": seen while writing the strategies, then covered by them.
BUGS_FIXED = [
    {"found_by": "hypothesis", "where": "core/data.py _read_parquet",
     "what": "a parquet string column holding bytes that are not UTF-8 raised a bare "
             "UnicodeDecodeError (traceback); now a UserError naming the file"},
    {"found_by": "hypothesis", "where": "core/data.py _read_parquet",
     "what": "pyarrow's error text runs over several lines: the message is now one line, "
             "at most 200 characters of pyarrow's reason"},
    {"found_by": "hypothesis", "where": "core/data.py load_text",
     "what": "a name starting with an unknown ~user (e.g. '~0') raised RuntimeError from "
             "Path.expanduser (traceback); now expanded with os.path.expanduser"},
    {"found_by": "review", "where": "core/data.py _load_local",
     "what": "a path too long for the file system raised OSError ENAMETOOLONG from "
             "Path.exists (traceback); now a UserError, long paths elided in the message"},
    {"found_by": "review", "where": "core/data.py _load_local",
     "what": "a FIFO or device named like a text file (pipe.txt, a .jsonl link to "
             "/dev/zero) blocked or read without end (hang); now refused as not a regular file"},
    {"found_by": "review", "where": "core/data.py load_text / token_windows",
     "what": "an empty name said \"'.' is a directory\"; a negative seed raised numpy's "
             "ValueError: both are clear UserErrors now"},
    {"found_by": "hypothesis", "where": "impq_tui/cli.py --budget-bytes",
     "what": "a budget of hundreds of digits was accepted and then failed writing "
             "allocations/bytes-<digits>.json (name too long) with a misleading 'continue "
             "with run --resume .../allocations' message; budgets above 10**18 bytes are "
             "refused by argparse"},
    {"found_by": "hypothesis", "where": "impq_tui/cli.py, cli_compare.py, cli_export.py",
     "what": "argparse's type=int/float errors echoed the whole value (5,000 characters); "
             "the value is quoted cut short now (_whole, _real, _shown)"},
    {"found_by": "review", "where": "impq_tui/cli.py cmd_run --resume",
     "what": "a resume that failed before adding a sample left config.json rewritten "
             "(new --samples/--micro-batch/--compile) and, in-process, run.lock held; "
             "config.json is put back and the lock released"},
    {"found_by": "review", "where": "impq_tui/cli.py _check_run_args",
     "what": "--seed -1 or >= 2**63 failed with a traceback after the model had loaded; "
             "--samples 10**12 hung building the list of sample indices; --gpus N above the "
             "visible GPUs, an empty --run-dir/--resume: all refused before any work"},
    {"found_by": "review", "where": "impq_tui/cli.py cmd_run",
     "what": "--run-dir below a file or too long raised a raw OSError (traceback) from "
             "RunDir.create; now a UserError"},
    {"found_by": "review", "where": "impq_tui/cli.py _device (run, eval, compare, export)",
     "what": "--device other than cpu/cuda/cuda:N reached torch.device() (RuntimeError on a "
             "GPU machine); now checked by argparse"},
    {"found_by": "review", "where": "impq_tui/cli.py, cli_compare.py, cli_export.py",
     "what": "a missing/empty/undecodable local --calib-text or --eval-text and "
             "--eval-window-tokens 1 were reported only after loading the model (export: "
             "after quantizing and writing it); now before"},
    {"found_by": "review", "where": "impq_tui/cli_export.py _check_out",
     "what": "--out '' or '.' (the current directory), '..', '/', '~' with --force would "
             "move the folder aside and delete it after writing the export; refused now, "
             "as is an unknown ~user (RuntimeError before)"},
    {"found_by": "hypothesis", "where": "core/models.py _load_gguf, _check_architecture",
     "what": "a GGUF file cut short after its magic bytes raised struct.error, and a config.json "
             "field of the wrong type huggingface_hub's StrictDataclassFieldValidationError "
             "(tracebacks); both are clear model errors now (test_damaged_model_files_are_a_clear_error)"},
    {"found_by": "hypothesis", "where": "impq_tui/cli.py Parser",
     "what": "argparse's 'unrecognized arguments' echoed a pasted value in full (a message of "
             "thousands of characters); every word over 60 characters is cut short now"},
    {"found_by": "hypothesis", "where": "core/export/gptq.py load",
     "what": "with GPTQModel installed, exporting a run whose model path is gone raised "
             "huggingface_hub's HFValidationError (traceback); a clear error now"}
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=10.0,
                        help="multiply every test's example count (default 10)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        counts_path, junit = Path(tmp) / "counts.json", Path(tmp) / "junit.xml"
        env = {**os.environ, "IMPQ_FUZZ_SCALE": str(args.scale),
               "IMPQ_FUZZ_COUNTS": str(counts_path), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q",
                               "-p", "no:cacheprovider", f"--junitxml={junit}"],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
        failures = []
        if junit.exists():
            for case in ET.parse(junit).iter("testcase"):
                for bad in [*case.findall("failure"), *case.findall("error")]:
                    failures.append({"test": case.get("name"),
                                     "message": (bad.get("message") or "").split("\n")[0][:300]})
    hangs = [f for f in failures if "Hang" in f["message"]]
    record = {
        "text_loader_inputs": counts.get("text_loader_inputs", 0),
        "cli_argv_inputs": counts.get("cli_argv_inputs", 0),
        "tracebacks": len(failures) - len(hangs),
        "hangs": len(hangs),
        "failures": failures,
        "bugs_fixed": BUGS_FIXED,
        "known_not_fixed": [],
        "scale": args.scale,
        "pytest_exit": proc.returncode,
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(proc.stdout.strip().split("\n")[-1])
    print(f"{record['text_loader_inputs']} text-loader inputs, {record['cli_argv_inputs']} "
          f"command lines, {record['tracebacks']} tracebacks, {record['hangs']} hangs "
          f"in {seconds:.0f} s -> {args.out}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
