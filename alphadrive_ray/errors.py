"""Errors caused by the user's input, reported without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a file, a config value, a flag).

    The CLI prints the message and exits with status 2; no traceback. Messages name the
    file, line and field where they can, and say how to fix the problem.
    """

    exit_code = 2


class RunAborted(UserError):
    """A run stopped on a failure it cannot recover from (a learner died, say).

    The message says what happened and how to resume; the CLI exits with status 1.
    """

    exit_code = 1
