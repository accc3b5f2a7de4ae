"""Errors a user can cause. The CLI prints them as one paragraph and exits with 2."""


import re


class UserError(Exception):
    """Bad input from the user: a wrong path, an unsupported model, an impossible budget.

    The message says what was wrong and what to do about it. It names a setting by its
    field in backticks (`window_tokens`), never by a command-line flag or a form label:
    each face renders the fields in its own words (render()).
    """


class Cancelled(Exception):
    """A long job stopped because its caller set the cancel event (SPQE between
    evaluations, eval, compare, export, a wait on a build lock)."""


class InvalidField(UserError):
    """One field of a request (core.requests) holds a value it may not have.

    `field` is core's name for it (`eval_window_tokens`) and the message is that name
    followed by `problem`; a face that calls the field otherwise (the CLI's
    `--eval-window-tokens`, the setup form's "Tokens per window") shows `named(its name)`.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem

    def named(self, name: str) -> str:
        return f"{name} {self.problem}"


# How an impq-tui process ends, for the CLI and for the app that follows a run process.
EXIT_USER_ERROR = 2         # a UserError: one paragraph on stderr
EXIT_CANCELLED = 130        # stopped by a signal (SIGINT, SIGTERM, SIGHUP) or interrupted


def render(message: str, names: dict[str, str]) -> str:
    """A message with each `field` that `names` knows written as that face names it (the
    CLI's flags, the setup form's labels)."""
    return re.sub(r"`([a-z_]+)`", lambda m: names.get(m.group(1), m.group(0)), message)
