"""`impq-tui [--run DIR | --runs DIR]`: the Textual app (the only way in from the CLI to the screens)."""
from __future__ import annotations


def command(args) -> int:
    from impq_tui.app import run_app

    return run_app(run_dir=args.run, runs=args.runs)
