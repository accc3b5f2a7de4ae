"""How a sub-command ends: a user error is one paragraph and exit 2, an interrupt exit 130."""
from __future__ import annotations

import errno
import os
import sys

from core.errors import EXIT_CANCELLED, EXIT_USER_ERROR
from impq_tui.cli.args import FLAGS


def run_reporting_errors(command, args) -> int:
    from core.errors import UserError
    from impq_tui.libraries import quiet_libraries

    quiet_libraries()
    try:
        code = command(args)
        sys.stdout.flush()      # a full or closed stdout shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more can be said there; stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # print() to a stdout on a full disk (`> /dev/full`): an error without a file name;
        # every file impq-tui writes itself reports failures as UserErrors.
        if exc.filename is not None or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
            raise
        print(f"impq-tui: error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_USER_ERROR
    except UserError as exc:
        if args.debug:
            raise
        print(f"impq-tui: error: {message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("impq-tui: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE, as a shell reports a process a closed pipe ended


def save_or_warn(run, name: str, record: dict) -> None:
    """Keep a result in the run directory; a read-only or full one only loses the copy,
    the command still prints its answer."""
    from core.errors import UserError

    try:
        run.write_json(name, record)
    except UserError as exc:
        print(f"impq-tui: warning: {message(exc)}", file=sys.stderr)


def message(exc) -> str:
    """A user error as the command line says it: a request field by its flag."""
    from core.errors import InvalidField, render

    if isinstance(exc, InvalidField):
        return render(exc.named(FLAGS.get(exc.field, exc.field)), FLAGS)
    return render(str(exc), FLAGS)
