"""How a sub-command ends: a user error is one paragraph and exit 2, an interrupt exit 130."""
from __future__ import annotations

import sys

from core.errors import EXIT_CANCELLED, EXIT_USER_ERROR
from impq_tui.cli.args import FLAGS


def run_reporting_errors(command, args) -> int:
    from core.errors import UserError
    from impq_tui.libraries import quiet_libraries

    quiet_libraries()
    try:
        return command(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"impq-tui: error: {message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("impq-tui: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


def message(exc) -> str:
    """A user error as the command line says it: a request field by its flag."""
    from core.errors import InvalidField, render

    if isinstance(exc, InvalidField):
        return render(exc.named(FLAGS.get(exc.field, exc.field)), FLAGS)
    return render(str(exc), FLAGS)
