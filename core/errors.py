"""Errors a user can cause. The CLI prints them as one paragraph and exits with 2."""


class UserError(Exception):
    """Bad input from the user: a wrong path, an unsupported model, an impossible budget.

    The message says what was wrong and what to do about it.
    """
