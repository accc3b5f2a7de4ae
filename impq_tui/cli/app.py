"""`impq-tui [--run DIR | --runs DIR]`: the Textual app (the only way in from the CLI to the screens)."""
from __future__ import annotations

import sys


def command(args) -> int:
    from core.errors import UserError

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Under cron, CI or a pipe the app would write escape codes and wait for keys
        # that never come.
        raise UserError("the app needs a terminal (stdin and stdout are not one here). Use the "
                        "headless commands instead: `impq-tui run`, `solve`, `eval`, `compare`, "
                        "`export`.")
    from impq_tui.app import run_app

    return run_app(run_dir=args.run, runs=args.runs)
