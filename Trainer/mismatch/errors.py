"""Errors the user can act on.

A :class:`UserError` is bad input or a bad request, not a bug: the command line prints its message as one
line and exits with status 2, without a traceback. The message says what is wrong and what to do.
"""


class UserError(Exception):
    """Bad input: one line that says what is wrong and what to do about it."""


class Cancelled(Exception):
    """Training was asked to stop (SIGINT / SIGTERM) and stopped cleanly after a checkpoint."""
