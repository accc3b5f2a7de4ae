"""Argument types and options shared by the sub-commands, and the flag of each request
field. A type only parses (argparse reports what is not a number); which values are
allowed is core's to say (core.requests)."""
from __future__ import annotations

import argparse
import re


def shown(text: str, limit: int = 40) -> str:
    """A value the user typed, quoted for a message, cut short when it is very long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


class Parser(argparse.ArgumentParser):
    """argparse, with every very long word of its messages cut short: `unrecognized
    arguments: ...` would otherwise echo a pasted megabyte back at the user."""

    def error(self, message: str):
        super().error(re.sub(r"\S{61,}", lambda m: m.group()[:60] + "...", message))


def bits(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number of bits (e.g. 2.5)") from None


def whole(text: str) -> int:
    """int(), with an error that quotes at most the start of a very long value."""
    try:
        return int(text)
    except ValueError:      # also a number too long to convert (over 4300 digits)
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a whole number") from None


def real(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None


def device(text: str) -> str:
    """cpu, cuda or cuda:N (checked here: torch.device() raises a bare RuntimeError on
    anything else, and that only once a model is about to be loaded)."""
    if text in ("", "auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cuda, cuda:N or cpu")


# Each field of core.requests, as the command line names it (core.errors.InvalidField
# names the field; the CLI shows the flag).
FLAGS = {
    "model": "--model", "calib_text": "--calib-text", "backend": "--backend",
    "group_size": "--group-size", "samples": "--samples", "windows": "--windows",
    "window_tokens": "--window-tokens", "seed": "--seed", "antithetic": "--antithetic",
    "device": "--device", "micro_batch": "--micro-batch", "compile": "--compile",
    "gpus": "--gpus", "run_dir": "--run-dir", "resume": "--resume",
    "bits": "--bits", "budget_bytes": "--budget-bytes", "alpha": "--alpha", "method": "--local/--fit",
    "eval_text": "--eval-text", "eval_windows": "--eval-windows",
    "eval_window_tokens": "--eval-window-tokens", "out": "--out", "force": "--force",
    "evaluate": "--eval", "verify": "--verify", "gguf_types": "--gguf-types",
    "levels": "--levels", "until_settled": "--settle-bits",
}

# --backend of `run` (SPQE's backends) and of eval/export (the export formats: gptq too).
RUN_BACKENDS = ("quanto", "hqq", "gguf", "gptq")
EXPORT_BACKENDS = ("quanto", "hqq", "gptq", "gguf")


def add_gguf_types(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf-types", nargs="+", metavar="TYPE", type=str.upper,
                   help="with --backend gguf: the llama.cpp type of each level, lowest first "
                        "(default Q2_K Q4_K, or Q<bits>_K per --levels; K-quants, Q8_0, IQ types)")


def gguf_types(args) -> str | None:
    types = getattr(args, "gguf_types", None)
    return ",".join(types) if types else None


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--bits", type=bits, help="target average bits per weight, 2.0 to 4.0 (the run's lowest to highest level)")
    group.add_argument("--budget-bytes", type=whole,
                       help="memory budget for the decoder layers' quantized weights, in bytes")
    p.add_argument("--alpha", type=real, default=0.5,
                   help="shrinkage of the covariance toward its diagonal (default 0.5)")
    add_method_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """The allocation model: the paper's IMPQ by default, or one of our two extensions."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--local", dest="method", action="store_const", const="impq-local",
                       help="IMPQ-local, our extension: weight each marginal by how close its step "
                            "is to the budget's number of 2-bit layers (README, Quality)")
    group.add_argument("--fit", dest="method", action="store_const", const="impq-fit",
                       help="IMPQ-fit, our extension: the quadratic model fitted to every state "
                            "SPQE's walks visited (README, Quality)")
    group.add_argument("--checked", dest="method", action="store_const", const="impq-checked",
                       help="IMPQ-fit, checked, our extension: about 20 candidate allocations (IMPQ, "
                            "IMPQ-local, IMPQ-fit and its next best, fits on each half of the walks, "
                            "the best visited states and their neighbours) measured on at least 16 windows "
                            "of the run's calibration text, the least loss kept; loads the model "
                            "(README, Quality)")
    p.set_defaults(method="impq")


def method_name(args) -> str:
    return getattr(args, "method", "impq")


def file_stem(args) -> str:
    from core.evaluate import result_stem

    return result_stem(args.bits, args.budget_bytes, method_name(args))


def add_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    """What perplexity is measured on, for eval, compare and export alike; the defaults
    are core.settings' (one place)."""
    from core.settings import EVAL_TEXT, EVAL_WINDOWS

    p.add_argument("--eval-text", help=f"builtin, wikitext2, c4 or a .txt/.jsonl/.parquet path "
                                       f"(default {EVAL_TEXT}: the builtin text's evaluation half)")
    p.add_argument("--eval-windows", type=whole,
                   help=f"evaluation windows (default {EVAL_WINDOWS}, or all the text holds)")
    p.add_argument("--eval-window-tokens", type=whole,
                   help="tokens per evaluation window (default 128 on a CPU, 2048 on a GPU)")
