"""The `impq-tui` command: the Textual app with no sub-command, headless sub-commands
(run, solve, eval, compare, export) for batch jobs. User errors print one paragraph and
exit 2.

One module per sub-command, each with `add_parser(sub)` and `command(args)`; argument
types in `args`, how a command ends in `errors`."""
from __future__ import annotations

import argparse

from impq_tui.cli import app, compare, export, run, solve
from impq_tui.cli import eval as eval_  # (the module, not the builtin)
from impq_tui.cli.args import Parser
from impq_tui.cli.errors import run_reporting_errors

SUB_COMMANDS = {"run": run, "solve": solve, "eval": eval_, "compare": compare, "export": export}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="impq-tui",
        description="Interaction-aware mixed-precision quantization (SPQE + IMPQ). With no "
                    "sub-command, opens the terminal app.")
    parser.add_argument("--run", metavar="DIR", help="open this run directory in the app (follows a run in progress)")
    parser.add_argument("--runs", metavar="DIR", default="runs",
                        help="the folder whose runs the app lists to pick from (default: runs)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUB_COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = app if args.command is None else SUB_COMMANDS[args.command]
    return run_reporting_errors(module.command, args)
